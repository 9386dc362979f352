"""Amazon FSx for Lustre data repositories: move data between a file system and the S3 prefix it is linked to.

The amazon provider has no FSx hook. This one is written its way (``AwsBaseHook``
with ``client_type="fsx"``), so it could move there: finding a path's data
repository association (a file system path <-> an S3 prefix, made with the file
system), and data repository tasks (import metadata from S3, export to S3, release
file data already in S3), whose progress ``FsxDataRepositoryTaskTrigger`` follows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from dtp.naming import aws_tags

TERMINAL_TASK_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


def _tags(tags: dict[str, str] | None) -> dict[str, Any]:
    """FSx's ``Tags`` argument; FSx refuses an empty list, so no tags means no argument."""
    return {"Tags": aws_tags(tags)} if tags else {}


class FsxHook(AwsBaseHook):
    """Interact with Amazon FSx for Lustre's data repository APIs through boto3's ``fsx`` client.

    Additional arguments (such as ``aws_conn_id``) are passed to ``AwsBaseHook``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "fsx"
        super().__init__(*args, **kwargs)

    def find_data_repository_association(self, file_system_id: str, file_system_path: str) -> dict[str, Any] | None:
        """The association of ``file_system_path`` on the file system, if there is one."""
        for association in self._described("describe_data_repository_associations", "Associations", file_system_id):
            if association["FileSystemPath"] == file_system_path and association["Lifecycle"] != "DELETING":
                return association
        return None

    def start_data_repository_task(
        self,
        file_system_id: str,
        task_type: str,
        paths: list[str],
        report_path: str,
        client_request_token: str,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Start a task on ``paths`` (file system paths) and return its id; its report of failed files goes to
        the S3 ``report_path``. The same ``client_request_token`` returns the same task, so a retry starts none."""
        response = self.conn.create_data_repository_task(
            Type=task_type,
            FileSystemId=file_system_id,
            Paths=paths,
            Report={
                "Enabled": True,
                "Path": report_path,
                "Format": "REPORT_CSV_20191124",
                "Scope": "FAILED_FILES_ONLY",
            },
            ClientRequestToken=client_request_token,
            **_tags(tags),
        )
        task = response["DataRepositoryTask"]
        self.log.info("Data repository task %s (%s) on %s: %s", task["TaskId"], task_type, file_system_id, paths)
        return task["TaskId"]

    def find_data_repository_tasks(self, file_system_id: str, tag_key: str, tag_value: str) -> list[dict[str, Any]]:
        """The file system's tasks tagged ``tag_key=tag_value``, oldest first."""
        found = [
            task
            for task in self._described("describe_data_repository_tasks", "DataRepositoryTasks", file_system_id)
            if {"Key": tag_key, "Value": tag_value} in task.get("Tags", [])
        ]
        return sorted(found, key=lambda task: task["CreationTime"])

    def _described(self, operation: str, key: str, file_system_id: str) -> Iterator[dict[str, Any]]:
        """Every item of a describe call filtered to the file system, following NextToken (botocore has no
        paginator for these)."""
        kwargs: dict[str, Any] = {"Filters": [{"Name": "file-system-id", "Values": [file_system_id]}]}
        while True:
            page = getattr(self.conn, operation)(**kwargs)
            yield from page[key]
            if not page.get("NextToken"):
                return
            kwargs["NextToken"] = page["NextToken"]

    def get_data_repository_task(self, task_id: str) -> dict[str, Any] | None:
        """The task, or None once FSx no longer knows it."""
        try:
            return self.conn.describe_data_repository_tasks(TaskIds=[task_id])["DataRepositoryTasks"][0]
        except self.conn.exceptions.DataRepositoryTaskNotFound:
            return None

    def cancel_data_repository_task(self, task_id: str) -> None:
        """Cancel the task (FSx finishes the file in flight); one that already ended is left as it is."""
        try:
            self.conn.cancel_data_repository_task(TaskId=task_id)
        except (self.conn.exceptions.DataRepositoryTaskEnded, self.conn.exceptions.DataRepositoryTaskNotFound):
            self.log.info("FSx task %s has already ended", task_id)
