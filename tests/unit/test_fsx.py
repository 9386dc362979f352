"""FsxHook, FsxDataRepositoryTaskTrigger and FsxDataRepositoryTaskOperator against botocore's FSx service model.

The local emulator has no FSx data repository APIs, so botocore's Stubber answers: every request DTP sends is
validated against the real service model (botocore refuses a wrong parameter before the Stubber sees it), and
every canned response against the model's output shapes.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import AsyncMock

import botocore.session
import pytest
from airflow.sdk.exceptions import TaskDeferred
from botocore.stub import ANY, Stubber

import dtp.operators.checkpoints as checkpoint_operators
import dtp.operators.fsx as fsx_operators
import dtp.triggers.fsx as fsx_triggers
from dtp.hooks.fsx import FsxHook
from dtp.operators.fsx import (
    TASK_KEY_TAG,
    FsxDataRepositoryTaskFailed,
    FsxDataRepositoryTaskOperator,
    task_key,
)
from dtp.platforms.service_models import enum_values

FS = "fs-0123456789abcdef0"
CREATED = datetime(2026, 12, 2, tzinfo=UTC)


@pytest.fixture
def hook(offline_aws: None) -> FsxHook:
    return FsxHook(aws_conn_id=None, region_name="us-east-1")


def _association(path: str, prefix: str) -> dict:
    return {
        "AssociationId": "dra-0123456789abcdef0",
        "FileSystemId": FS,
        "Lifecycle": "AVAILABLE",
        "FileSystemPath": path,
        "DataRepositoryPath": prefix,
    }


def test_a_paths_association_is_found_unless_it_is_being_deleted(hook: FsxHook, stub: Stubber) -> None:
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    associations = [
        {**_association("/runs", "s3://b/runs/"), "Lifecycle": "DELETING"},
        _association("/data", "s3://b/"),
    ]
    for _ in range(2):
        stub.add_response("describe_data_repository_associations", {"Associations": associations}, filters)
    assert hook.find_data_repository_association(FS, "/runs") is None
    assert hook.find_data_repository_association(FS, "/data") == associations[1]


def _task(
    task_id: str, lifecycle: str, key: str = "", paths: tuple[str, ...] = ("checkpoints/run1",), **status
) -> dict:
    return {
        "TaskId": task_id,
        "Lifecycle": lifecycle,
        "Type": "EXPORT_TO_REPOSITORY",
        "CreationTime": CREATED,
        "FileSystemId": FS,
        "Paths": list(paths),
        **({"Tags": [{"Key": TASK_KEY_TAG, "Value": key}]} if key else {}),
        "Status": {"TotalCount": 10, "SucceededCount": 10, "FailedCount": 0, **status},
        "Report": {"Enabled": True, "Path": "s3://bucket/reports"},
    }


@pytest.mark.parametrize("task_type", enum_values("fsx", "DataRepositoryTaskType"))
def test_every_task_type_is_a_valid_request(hook: FsxHook, stub: Stubber, task_type: str) -> None:
    stub.add_response(
        "create_data_repository_task",
        {"DataRepositoryTask": _task("task-0123456789abcdef0", "PENDING")},
        {
            "Type": task_type,
            "FileSystemId": FS,
            "Paths": ["checkpoints/run1"],
            "Report": {
                "Enabled": True,
                "Path": "s3://bucket/reports",
                "Format": "REPORT_CSV_20191124",
                "Scope": "FAILED_FILES_ONLY",
            },
            "ClientRequestToken": "k-1",
        },
    )
    assert hook.start_data_repository_task(FS, task_type, ["checkpoints/run1"], "s3://bucket/reports", "k-1") == (
        "task-0123456789abcdef0"
    )


def test_the_operators_request_token_fits_fsx() -> None:
    # botocore checks no maximum length or pattern, FSx does: check the token against the model's limits.
    shape = botocore.session.get_session().get_service_model("fsx").shape_for("ClientRequestToken")
    token = f"{task_key(_ti())}-{99}"
    assert len(token) <= shape.metadata["max"] and re.fullmatch(shape.metadata["pattern"], token)


def test_trigger_waits_for_the_end_and_reports_counts(hook: FsxHook, stub: Stubber, monkeypatch, first_event) -> None:
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: hook)
    for lifecycle, done in (("EXECUTING", 4), ("SUCCEEDED", 10)):
        response = {"DataRepositoryTasks": [_task("task-0123456789abcdef1", lifecycle, SucceededCount=done)]}
        stub.add_response("describe_data_repository_tasks", response, {"TaskIds": ["task-0123456789abcdef1"]})
    trigger = fsx_triggers.FsxDataRepositoryTaskTrigger("task-0123456789abcdef1", aws_conn_id=None, poll_interval=0)

    path, kwargs = trigger.serialize()
    assert path == "dtp.triggers.fsx.FsxDataRepositoryTaskTrigger"
    assert fsx_triggers.FsxDataRepositoryTaskTrigger(**kwargs).serialize() == (path, kwargs)  # as the triggerer does
    event = first_event(trigger)
    assert event["status"] == "success" and (event["succeeded"], event["total"], event["failed"]) == (10, 10, 0)


def _ti(try_number: int = 1) -> SimpleNamespace:
    return SimpleNamespace(dag_id="d", run_id="r", task_id="export", map_index=-1, try_number=try_number)


def _operator() -> FsxDataRepositoryTaskOperator:
    return FsxDataRepositoryTaskOperator(
        task_id="export",
        file_system_id=FS,
        repository_task_type="EXPORT_TO_REPOSITORY",
        paths=["checkpoints/run1"],
        report_path="s3://bucket/reports",
        tags={"dtp:run": "r1"},
        aws_conn_id=None,
    )


def test_operator_starts_once_then_reattaches_then_reuses(hook: FsxHook, stub: Stubber, monkeypatch) -> None:
    monkeypatch.setattr(fsx_operators, "FsxHook", lambda **_: hook)
    key = task_key(_ti())
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    other = _task("task-0123456789abcdef9", "EXECUTING", key="someone-else")
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [other]}, filters)
    stub.add_response(
        "create_data_repository_task",
        {"DataRepositoryTask": _task("task-0123456789abcdef1", "PENDING", key=key)},
        {
            "Type": "EXPORT_TO_REPOSITORY",
            "FileSystemId": FS,
            "Paths": ["checkpoints/run1"],
            "Report": ANY,
            "ClientRequestToken": f"{key}-1",
            "Tags": [{"Key": "dtp:run", "Value": "r1"}, {"Key": TASK_KEY_TAG, "Value": key}],
        },
    )
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        _operator().execute({"ti": _ti(1)})
    assert deferred.value.trigger.repository_task_id == "task-0123456789abcdef1"
    assert deferred.value.trigger.started_at >= before  # the deadline counts from now
    # A retry of a try that died while waiting finds its task by the tag and waits for it again: nothing is started,
    # and the deadline still counts from when the task was created.
    running = _task("task-0123456789abcdef1", "EXECUTING", key=key)
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [other, running]}, filters)
    with pytest.raises(TaskDeferred) as deferred:
        _operator().execute({"ti": _ti(2)})
    assert deferred.value.trigger.repository_task_id == "task-0123456789abcdef1"
    assert deferred.value.trigger.started_at == CREATED.timestamp()
    # Once it succeeded, a cleared task returns its outcome.
    done = _task("task-0123456789abcdef1", "SUCCEEDED", key=key)
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [done]}, filters)
    outcome = _operator().execute({"ti": _ti(3)})
    assert outcome is not None and outcome["task_id"] == "task-0123456789abcdef1"


def test_a_retry_reattaches_to_its_task_on_a_later_page(hook: FsxHook, stub: Stubber, monkeypatch) -> None:
    """FSx answers DescribeDataRepositoryTasks a page at a time (botocore has no paginator for it): the retry's task,
    on the second page, is found and waited for again; nothing is started (the Stubber would refuse a create)."""
    monkeypatch.setattr(fsx_operators, "FsxHook", lambda **_: hook)
    key = task_key(_ti())
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    others = [_task(f"task-0123456789abcdef{n}", "SUCCEEDED", key="someone-else") for n in (7, 8)]
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": others, "NextToken": "page-2"}, filters)
    running = _task("task-0123456789abcdef1", "EXECUTING", key=key)
    stub.add_response(
        "describe_data_repository_tasks", {"DataRepositoryTasks": [running]}, {**filters, "NextToken": "page-2"}
    )
    with pytest.raises(TaskDeferred) as deferred:
        _operator().execute({"ti": _ti(2)})
    assert deferred.value.trigger.repository_task_id == "task-0123456789abcdef1"


def test_a_paths_association_on_a_later_page_is_found(hook: FsxHook, stub: Stubber) -> None:
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    first = {"Associations": [_association("/data", "s3://b/")], "NextToken": "page-2"}
    stub.add_response("describe_data_repository_associations", first, filters)
    second = {"Associations": [_association("/runs", "s3://b/runs/")]}
    stub.add_response("describe_data_repository_associations", second, {**filters, "NextToken": "page-2"})
    assert hook.find_data_repository_association(FS, "/runs") == second["Associations"][0]


def test_a_cleared_task_asking_for_other_paths_starts_its_own(hook: FsxHook, stub: Stubber, monkeypatch) -> None:
    # A cleared save_checkpoint after more training exports a newer step: the older export is not its answer.
    monkeypatch.setattr(fsx_operators, "FsxHook", lambda **_: hook)
    key = task_key(_ti())
    older = _task("task-0123456789abcdef1", "SUCCEEDED", key=key, paths=("checkpoints/run0",))
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [older]}, filters)
    started = _task("task-0123456789abcdef2", "PENDING", key=key)
    stub.add_response("create_data_repository_task", {"DataRepositoryTask": started}, {
        "Type": "EXPORT_TO_REPOSITORY", "FileSystemId": FS, "Paths": ["checkpoints/run1"], "Report": ANY,
        "ClientRequestToken": f"{key}-4", "Tags": ANY,
    })  # fmt: skip
    with pytest.raises(TaskDeferred) as deferred:
        _operator().execute({"ti": _ti(4)})
    assert deferred.value.trigger.repository_task_id == "task-0123456789abcdef2"


def test_a_failed_task_fails_the_operator_with_counts_and_report() -> None:
    event = {
        "status": "failed",
        "task_id": "task-0123456789abcdef1",
        "lifecycle": "FAILED",
        "total": 10,
        "succeeded": 7,
        "failed": 3,
        "released_bytes": 0,
        "failure": "3 files could not be exported",
        "report_path": "s3://bucket/reports",
    }
    with pytest.raises(FsxDataRepositoryTaskFailed, match=r"ended FAILED \(7 of 10 files done, 3 failed\)"):
        _operator().execute_complete({}, event)


def test_an_unknown_task_type_is_refused_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match=r"repository_task_type: got 'EXPORT'; allowed: .*EXPORT_TO_REPOSITORY"):
        FsxDataRepositoryTaskOperator(
            task_id="t", file_system_id=FS, repository_task_type="EXPORT", paths=[], report_path=""
        )


def _trigger(**options) -> fsx_triggers.FsxDataRepositoryTaskTrigger:
    return fsx_triggers.FsxDataRepositoryTaskTrigger(
        "task-0123456789abcdef1", aws_conn_id=None, poll_interval=0, **options
    )


def test_a_task_fsx_no_longer_knows_fails_the_wait(hook: FsxHook, stub: Stubber, monkeypatch, first_event) -> None:
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: hook)
    stub.add_client_error("describe_data_repository_tasks", "DataRepositoryTaskNotFound", "no such task")
    event = first_event(_trigger())
    assert (event["status"], event["lifecycle"]) == ("failed", "GONE") and "no longer knows" in event["failure"]


def test_a_task_still_running_at_the_deadline_fails_the_wait(
    hook: FsxHook, stub: Stubber, monkeypatch, first_event
) -> None:
    # The deadline is set when the task defers and survives a triggerer restart (the trigger is rebuilt from it).
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: hook)
    stub.add_response(
        "describe_data_repository_tasks",
        {"DataRepositoryTasks": [_task("task-0123456789abcdef1", "EXECUTING", SucceededCount=4)]},
        {"TaskIds": ["task-0123456789abcdef1"]},
    )
    deferred = _trigger(timeout=3600)
    deferred.started_at -= 3601
    event = first_event(fsx_triggers.FsxDataRepositoryTaskTrigger(**deferred.serialize()[1]))
    assert (event["status"], event["succeeded"]) == ("failed", 4)
    assert event["failure"] == "still EXECUTING after 3600 s; left running"


def test_killing_the_waiting_task_cancels_the_fsx_task(
    hook: FsxHook, stub: Stubber, monkeypatch, run_coroutine
) -> None:
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: hook)
    cancelled = {"Lifecycle": "CANCELING", "TaskId": "task-0123456789abcdef1"}
    stub.add_response("cancel_data_repository_task", cancelled, {"TaskId": "task-0123456789abcdef1"})
    run_coroutine(_trigger().on_kill())
    # A task that ended meanwhile is left as it is.
    stub.add_client_error("cancel_data_repository_task", "DataRepositoryTaskEnded", "already ended")
    run_coroutine(_trigger().on_kill())


@pytest.mark.parametrize(
    ("still_deferred", "cancels"),
    [(True, False), (False, True)],
    ids=["moved_to_another_triggerer", "killed"],  # how the task's state tells them apart: test_trigger_kill.py
)
def test_on_kill_cancels_the_fsx_task_unless_the_task_still_waits_on_its_trigger(
    hook: FsxHook, stub: Stubber, monkeypatch, run_coroutine, still_deferred: bool, cancels: bool
) -> None:
    monkeypatch.setattr(fsx_triggers, "task_still_deferred", AsyncMock(return_value=still_deferred))
    monkeypatch.setattr(fsx_triggers, "FsxHook", lambda **_: hook)
    if cancels:
        cancelling = {"Lifecycle": "CANCELING", "TaskId": "task-0123456789abcdef1"}
        stub.add_response("cancel_data_repository_task", cancelling, {"TaskId": "task-0123456789abcdef1"})
    run_coroutine(_trigger().on_kill())  # the stub refuses a call it was not given an answer for
    stub.assert_no_pending_responses()


def test_a_retried_checkpoint_export_keeps_its_deadline(hook: FsxHook, stub: Stubber, monkeypatch) -> None:
    """A retry of save_checkpoint waits for the export an earlier try started only what is left of export_timeout."""
    monkeypatch.setattr(checkpoint_operators, "FsxHook", lambda **_: hook)
    checkpoint = SimpleNamespace(
        bucket="artifacts", directory=Path("/fsx/runs/r1/checkpoints"), uri="s3://artifacts/r1"
    )
    monkeypatch.setattr(checkpoint_operators.checkpoints, "newest_checkpoint", lambda *_: checkpoint)
    monkeypatch.setattr(checkpoint_operators.SaveCheckpointOperator, "_exporting_file_system", lambda *_: FS)
    monkeypatch.setattr(checkpoint_operators.SaveCheckpointOperator, "_export_paths", lambda *_: ["checkpoints/run1"])
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id="save_checkpoint", map_index=-1, try_number=2)
    running = _task("task-0123456789abcdef1", "EXECUTING", key=task_key(ti))
    filters = {"Filters": [{"Name": "file-system-id", "Values": [FS]}]}
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [running]}, filters)
    op = checkpoint_operators.SaveCheckpointOperator(
        task_id="save_checkpoint", spec={"names": {"run_key": "r1"}, "tags": {}}, cluster={}, export_timeout=3600
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    trigger = deferred.value.trigger
    assert trigger.repository_task_id == "task-0123456789abcdef1"
    assert (trigger.started_at, trigger.timeout) == (CREATED.timestamp(), 3600)
