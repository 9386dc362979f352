"""Amazon FSx for Lustre data repositories: link a file system path to S3 and move data between them.

The amazon provider has no FSx hook. This one is written its way (``AwsBaseHook``
with ``client_type="fsx"``), so it could move there: data repository
associations (a file system path <-> an S3 prefix, with automatic import and
export) and data repository tasks (import metadata from S3, export to S3, release
file data already in S3), whose progress ``FsxDataRepositoryTaskTrigger`` follows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from dtp.naming import aws_tags

# The S3 events a data repository association imports and exports automatically.
AUTO_EVENTS = ["NEW", "CHANGED", "DELETED"]
TERMINAL_TASK_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})


def _tags(tags: dict[str, str] | None) -> dict[str, Any]:
    """FSx's ``Tags`` argument; FSx refuses an empty list, so no tags means no argument."""
    return {"Tags": aws_tags(tags)} if tags else {}


class DataRepositoryConflict(ValueError):
    """The file system path is already linked to another S3 prefix."""


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

    def ensure_data_repository_association(
        self,
        file_system_id: str,
        file_system_path: str,
        data_repository_path: str,
        tags: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Link ``file_system_path`` to the S3 prefix ``data_repository_path`` with automatic import and export.

        Idempotent: an existing association of the same path and prefix is returned; one to another prefix raises
        ``DataRepositoryConflict``.
        """
        existing = self.find_data_repository_association(file_system_id, file_system_path)
        if existing:
            if existing["DataRepositoryPath"].rstrip("/") != data_repository_path.rstrip("/"):
                raise DataRepositoryConflict(
                    f"{file_system_id}:{file_system_path} is linked to {existing['DataRepositoryPath']}, "
                    f"not {data_repository_path} ({existing['AssociationId']})"
                )
            self.log.info(
                "Data repository association %s already links %s", existing["AssociationId"], file_system_path
            )
            return existing
        response = self.conn.create_data_repository_association(
            FileSystemId=file_system_id,
            FileSystemPath=file_system_path,
            DataRepositoryPath=data_repository_path,
            BatchImportMetaDataOnCreate=True,
            S3={"AutoImportPolicy": {"Events": AUTO_EVENTS}, "AutoExportPolicy": {"Events": AUTO_EVENTS}},
            **_tags(tags),
        )
        association = response["Association"]
        self.log.info("Created data repository association %s: %s <-> %s", association["AssociationId"],
                      file_system_path, data_repository_path)  # fmt: skip
        return association

    def delete_data_repository_association(self, association_id: str) -> None:
        """Unlink, keeping the files on the file system (they are in S3 already when export is automatic)."""
        self.conn.delete_data_repository_association(AssociationId=association_id, DeleteDataInFileSystem=False)

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
