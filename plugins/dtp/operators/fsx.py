"""Run an FSx for Lustre data repository task (import from S3, export to S3, release) without a worker slot."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from dtp.hooks.fsx import FsxHook
from dtp.platforms.service_models import enum_values
from dtp.triggers.fsx import FsxDataRepositoryTaskTrigger, task_outcome

TASK_KEY_TAG = "dtp:task-key"


def task_key(ti: Any) -> str:
    """The tag value that marks a task instance's FSx tasks, the same on every try."""
    return hashlib.sha256(f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}".encode()).hexdigest()[:32]


def find_or_start_task(
    hook: FsxHook,
    ti: Any,
    *,
    file_system_id: str,
    task_type: str,
    paths: list[str],
    report_path: str,
    tags: dict[str, str],
) -> dict[str, Any]:
    """The task instance's data repository task of this type on these paths: one an earlier try started that still
    runs, else one that already succeeded, else one started now (``Lifecycle`` PENDING). FSx tasks carry a tag of
    the task instance, the same on every try, so a retry never starts a second one; a cleared task asked for other
    paths (a newer checkpoint) starts its own."""
    key = task_key(ti)
    earlier = [
        task
        for task in hook.find_data_repository_tasks(file_system_id, TASK_KEY_TAG, key)
        if task["Type"] == task_type and sorted(task.get("Paths", [])) == sorted(paths)
    ]
    for lifecycles in (("PENDING", "EXECUTING"), ("SUCCEEDED",)):
        found = [task for task in earlier if task["Lifecycle"] in lifecycles]
        if found:
            hook.log.info("FSx task %s of an earlier try is %s", found[-1]["TaskId"], found[-1]["Lifecycle"])
            return found[-1]
    task_id = hook.start_data_repository_task(
        file_system_id,
        task_type,
        paths,
        report_path,
        client_request_token=f"{key}-{ti.try_number}",
        tags={**tags, TASK_KEY_TAG: key},
    )
    return {"TaskId": task_id, "Lifecycle": "PENDING"}


def created_at(task: dict[str, Any]) -> float | None:
    """When FSx created ``task`` (epoch seconds), which an earlier try may have started: the trigger's deadline counts
    from then, so a retry does not restart it. None for a task started now (the deadline counts from the deferral)."""
    created = task.get("CreationTime")
    return created.timestamp() if created else None


class FsxDataRepositoryTaskFailed(AirflowException):
    """The data repository task ended FAILED or CANCELED."""


class FsxDataRepositoryTaskOperator(BaseOperator):
    """
    Start a data repository task on an FSx for Lustre file system and defer until it ends.

    Idempotent: tasks are tagged with a key of the task instance, so a retry
    re-attaches to this task's FSx task that is still running (the trigger's
    deadline counts from when FSx created it), or returns the one that already
    succeeded, instead of starting another.

    :param file_system_id: the FSx for Lustre file system
    :param repository_task_type: one of botocore's ``DataRepositoryTaskType`` values, e.g. ``EXPORT_TO_REPOSITORY``
    :param paths: file system paths (relative to the mount) the task covers
    :param report_path: S3 URI the report of failed files is written under
    :param tags: tags of the FSx task (DTP passes the run's tags)
    """

    template_fields: Sequence[str] = ("file_system_id", "paths", "report_path", "tags")

    def __init__(
        self,
        *,
        file_system_id: str,
        repository_task_type: str,
        paths: list[str],
        report_path: str,
        tags: dict[str, str] | None = None,
        aws_conn_id: str | None = "aws_default",
        poll_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if repository_task_type not in (allowed := enum_values("fsx", "DataRepositoryTaskType")):
            raise ValueError(f"repository_task_type: got {repository_task_type!r}; allowed: {', '.join(allowed)}")
        self.file_system_id = file_system_id
        self.repository_task_type = repository_task_type
        self.paths = paths
        self.report_path = report_path
        self.tags = tags or {}
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> dict[str, Any] | None:
        task = find_or_start_task(
            FsxHook(aws_conn_id=self.aws_conn_id),
            context["ti"],
            file_system_id=self.file_system_id,
            task_type=self.repository_task_type,
            paths=list(self.paths),
            report_path=self.report_path,
            tags=self.tags,
        )
        if task["Lifecycle"] == "SUCCEEDED":
            return task_outcome(task)
        self.defer(
            trigger=FsxDataRepositoryTaskTrigger(
                task["TaskId"], self.aws_conn_id, self.poll_interval, started_at=created_at(task)
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        counts = f"{event['succeeded']} of {event['total']} files done, {event['failed']} failed"
        if event["status"] != "success":
            raise FsxDataRepositoryTaskFailed(
                f"FSx task {event['task_id']} ended {event['lifecycle']} ({counts}): {event['failure'] or 'no reason'}"
                f"; failed files are listed under {event['report_path']}"
            )
        self.log.info("FSx task %s succeeded: %s", event["task_id"], counts)
        return {key: value for key, value in event.items() if key != "status"}
