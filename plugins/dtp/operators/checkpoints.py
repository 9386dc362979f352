"""Save a run's newest checkpoint to the artifacts bucket: exported by FSx for Lustre where it can, else uploaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from botocore.exceptions import ClientError

from dtp.hooks.fsx import DataRepositoryConflict, FsxHook
from dtp.naming import OWNER, TAG_PREFIX
from dtp.operators.fsx import find_or_start_task
from dtp.pipeline import checkpoints
from dtp.pipeline.checkpoints import Checkpoint
from dtp.pipeline.data import run_dir
from dtp.triggers.fsx import FsxDataRepositoryTaskTrigger

# Run directories sit under this folder of the shared filesystem, and their saved checkpoints under the same prefix
# of the artifacts bucket: one association of the two exports every run's checkpoint to its place.
RUNS_FOLDER = "runs"
MAX_TASK_PATHS = 100  # CreateDataRepositoryTask's limit


class SaveCheckpointOperator(BaseOperator):
    """
    Save the run's newest checkpoint to ``s3://<artifacts>/runs/<run>/checkpoints/`` before its cluster goes, and
    write ``MANIFEST.json`` last (a manifest means the copy is whole). A run that wrote none saves nothing.

    On a cluster whose FSx for Lustre file system is known (``fsx_file_system_id`` in the cluster: a
    ParallelCluster on an existing file system, a HyperPod cluster on Slurm mounting one), FSx copies the files
    itself: a data repository association links the file system's ``/runs`` to the bucket's ``runs/`` (made on
    first use, with no automatic import or export, and kept with the file system), and an ``EXPORT_TO_REPOSITORY``
    task, waited for in the triggerer, exports the checkpoint. A retry finds its FSx task again instead of
    starting another. While that association is being created, when the path is linked elsewhere, or when the
    export fails, this worker uploads the files instead, as on every other cluster (only what the bucket lacks).

    :param spec: the run spec from ``validate_params``
    :param cluster: the cluster from ``deploy_cluster``
    :param aws_conn_id: AWS connection
    :param poll_interval: seconds between checks of the FSx task
    """

    template_fields: Sequence[str] = ("spec", "cluster")

    def __init__(
        self,
        *,
        spec: Any,
        cluster: Any,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.cluster = cluster
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> dict[str, Any] | None:
        checkpoint = checkpoints.newest_checkpoint(self.spec, self.cluster, self.aws_conn_id)
        if checkpoint is None:
            return {"saved": False, "checkpoint_dir": str(run_dir(self.spec, self.cluster) / "checkpoints")}
        file_system_id = self._exporting_file_system(checkpoint)
        if file_system_id is None:
            return self._upload(checkpoint)
        task = find_or_start_task(
            FsxHook(aws_conn_id=self.aws_conn_id),
            context["ti"],
            file_system_id=file_system_id,
            task_type="EXPORT_TO_REPOSITORY",
            paths=self._export_paths(checkpoint),
            report_path=f"s3://{checkpoint.bucket}/{RUNS_FOLDER}/{self.spec['names']['run_key']}/fsx-export-report",
            tags=self.spec["tags"],
        )
        if task["Lifecycle"] == "SUCCEEDED":
            return checkpoints.write_manifest(self.spec, checkpoint, self.aws_conn_id) | {"exported_by": task["TaskId"]}
        self.log.info("FSx exports %s to %s: waiting for task %s", checkpoint.directory, checkpoint.uri, task["TaskId"])
        self.defer(
            trigger=FsxDataRepositoryTaskTrigger(task["TaskId"], self.aws_conn_id, self.poll_interval),
            method_name="execute_complete",
        )
        return None

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        checkpoint = checkpoints.newest_checkpoint(self.spec, self.cluster, self.aws_conn_id)
        if checkpoint is None:  # training is over: only someone deleting it makes it go
            raise FileNotFoundError(f"the checkpoint FSx task {event['task_id']} exported is gone from the cluster")
        counts = f"{event['succeeded']} of {event['total']} files, {event['failed']} failed"
        if event["status"] != "success":
            self.log.warning(
                "FSx task %s ended %s (%s): %s; failed files are listed under %s. Uploading from this worker instead",
                event["task_id"], event["lifecycle"], counts, event["failure"] or "no reason", event["report_path"],
            )  # fmt: skip
            return self._upload(checkpoint)
        self.log.info("FSx task %s exported the checkpoint: %s", event["task_id"], counts)
        return checkpoints.write_manifest(self.spec, checkpoint, self.aws_conn_id) | {"exported_by": event["task_id"]}

    def _upload(self, checkpoint: Checkpoint) -> dict[str, Any]:
        uploaded = checkpoints.upload_checkpoint(checkpoint, self.aws_conn_id)
        return checkpoints.write_manifest(self.spec, checkpoint, self.aws_conn_id) | uploaded

    def _export_paths(self, checkpoint: Checkpoint) -> list[str]:
        """The checkpoint's top-level folders and files, relative to the file system's root (DTP's trainer: the
        newest ``step_N``; another framework: all but its unfinished ``tmp*`` folders)."""
        folder = checkpoint.directory.relative_to(self.cluster["shared_dir"]).as_posix()
        return sorted({f"{folder}/{checkpoint.relative(path).split('/')[0]}" for path in checkpoint.files})

    def _exporting_file_system(self, checkpoint: Checkpoint) -> str | None:
        """The cluster's FSx file system when it can export this checkpoint now: its ``/runs`` linked to the
        bucket's ``runs/`` by an available association (made here when missing); None otherwise."""
        file_system_id = self.cluster.get("fsx_file_system_id")
        if not file_system_id:
            return None
        folder = checkpoint.directory.relative_to(self.cluster["shared_dir"])
        if folder.parts[0] != RUNS_FOLDER or len(self._export_paths(checkpoint)) > MAX_TASK_PATHS:
            return None
        try:
            association = FsxHook(aws_conn_id=self.aws_conn_id).ensure_data_repository_association(
                file_system_id,
                f"/{RUNS_FOLDER}",
                f"s3://{checkpoint.bucket}/{RUNS_FOLDER}/",
                tags={f"{TAG_PREFIX}owner": OWNER, f"{TAG_PREFIX}role": "checkpoint-export"},
                automatic=False,
            )
        except (DataRepositoryConflict, ClientError) as err:
            self.log.warning("FSx %s cannot export checkpoints (%s): uploading from this worker", file_system_id, err)
            return None
        if association["Lifecycle"] != "AVAILABLE":
            self.log.info(
                "The association %s exporting %s's /%s is %s: uploading from this worker; later runs export",
                association["AssociationId"], file_system_id, RUNS_FOLDER, association["Lifecycle"],
            )  # fmt: skip
            return None
        return file_system_id
