"""Save a run's newest checkpoint to the artifacts bucket: exported by FSx for Lustre where it can, else uploaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from botocore.exceptions import ClientError

from dtp.hooks.fsx import FsxHook
from dtp.operators.fsx import created_at, find_or_start_task
from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.pipeline import checkpoints
from dtp.pipeline.checkpoints import Checkpoint
from dtp.pipeline.run_dirs import RUNS_FOLDER, run_dir
from dtp.triggers.fsx import FsxDataRepositoryTaskTrigger

MAX_TASK_PATHS = 100  # CreateDataRepositoryTask's limit


class SaveCheckpointOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Save the run's newest checkpoint to ``s3://<artifacts>/runs/<run>/checkpoints/`` before its cluster goes, and
    write ``MANIFEST.json`` last (a manifest means the copy is whole). A run that wrote none saves nothing.

    On a cluster whose FSx for Lustre file system is known (``fsx_file_system_id`` in the cluster: a
    ParallelCluster on an existing file system, a HyperPod cluster on Slurm mounting one) and links its ``/runs``
    to the bucket's ``runs/`` (a data repository association its owner made: DTP never links a file system, since
    a linked one can no longer be backed up), FSx copies the files itself: an ``EXPORT_TO_REPOSITORY`` task on the
    checkpoint's folders, waited for in the triggerer. A retry finds its FSx task again instead of starting
    another, and waits only what is left of ``export_timeout`` since FSx created it. Otherwise, and when the export
    cannot start, fails or outlasts ``export_timeout`` (then it is cancelled), this worker uploads the files (only
    what the bucket lacks).

    :param spec: the run spec from ``validate_params``
    :param cluster: the cluster from ``deploy_cluster``
    :param aws_conn_id: AWS connection
    :param poll_interval: seconds between checks of the FSx task
    :param export_timeout: seconds the FSx export may take before the worker uploads instead (the cluster is kept
        meanwhile)
    """

    template_fields: Sequence[str] = ("spec", "cluster")

    def __init__(
        self,
        *,
        spec: Any,
        cluster: Any,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 30.0,
        export_timeout: float = 3 * 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.cluster = cluster
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval
        self.export_timeout = export_timeout

    def execute(self, context: Any) -> dict[str, Any] | None:
        checkpoint = checkpoints.newest_checkpoint(self.spec, self.cluster, self.aws_conn_id)
        if checkpoint is None:
            return {"saved": False, "checkpoint_dir": str(run_dir(self.spec, self.cluster) / "checkpoints")}
        file_system_id = self._exporting_file_system(checkpoint)
        paths = self._export_paths(checkpoint) if file_system_id else None
        if file_system_id is None or paths is None:
            return self._upload(checkpoint)
        hook = FsxHook(aws_conn_id=self.aws_conn_id)
        try:
            task = find_or_start_task(
                hook,
                context["ti"],
                file_system_id=file_system_id,
                task_type="EXPORT_TO_REPOSITORY",
                paths=paths,
                report_path=f"s3://{checkpoint.bucket}/{RUNS_FOLDER}/{self.spec['names']['run_key']}/fsx-export-report",
                tags=self.spec["tags"],
            )
        except ClientError as err:  # another task running on the file system, a limit, a permission
            self.log.warning("FSx cannot export the checkpoint (%s): uploading from this worker", err)
            return self._upload(checkpoint)
        if task["Lifecycle"] == "SUCCEEDED":
            return self._exported(checkpoint, task["TaskId"])
        self.log.info("FSx exports %s to %s: waiting for task %s", checkpoint.directory, checkpoint.uri, task["TaskId"])
        self.defer(
            trigger=FsxDataRepositoryTaskTrigger(
                task["TaskId"],
                self.aws_conn_id,
                self.poll_interval,
                timeout=self.export_timeout,
                started_at=created_at(task),
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        checkpoint = checkpoints.newest_checkpoint(self.spec, self.cluster, self.aws_conn_id)
        if checkpoint is None:  # training is over: only someone deleting it makes it go
            raise FileNotFoundError(f"the checkpoint FSx task {event['task_id']} exported is gone from the cluster")
        counts = f"{event['succeeded']} of {event['total']} files, {event['failed']} failed"
        if event["status"] == "success":
            self.log.info("FSx task %s exported the checkpoint: %s", event["task_id"], counts)
            return self._exported(checkpoint, event["task_id"])
        self.log.warning(
            "FSx task %s ended %s (%s): %s; failed files are listed under %s. Uploading from this worker instead",
            event["task_id"], event["lifecycle"], counts, event["failure"] or "no reason", event["report_path"],
        )  # fmt: skip
        if event["lifecycle"] in ("PENDING", "EXECUTING"):  # past export_timeout: it must not write under the upload
            FsxHook(aws_conn_id=self.aws_conn_id).cancel_data_repository_task(event["task_id"])
        return self._upload(checkpoint)

    def _exported(self, checkpoint: Checkpoint, task_id: str) -> dict[str, Any]:
        checkpoints.tag_checkpoint(checkpoint, self.aws_conn_id)  # FSx exports without the tag the bucket expires by
        return checkpoints.write_manifest(self.spec, checkpoint, self.aws_conn_id) | {"exported_by": task_id}

    def _upload(self, checkpoint: Checkpoint) -> dict[str, Any]:
        uploaded = checkpoints.upload_checkpoint(checkpoint, self.aws_conn_id)
        return checkpoints.write_manifest(self.spec, checkpoint, self.aws_conn_id) | uploaded

    def _export_paths(self, checkpoint: Checkpoint) -> list[str] | None:
        """The checkpoint's top-level folders and files, relative to the file system's root (DTP's trainer: the
        newest ``step_N``; another framework: all but its unfinished ``tmp*`` folders); None when exporting them
        would not copy exactly the files the manifest lists (a ``tmp*`` folder or a link inside them), or they are
        more than one FSx task takes."""
        tops = [
            checkpoint.directory / top
            for top in sorted({checkpoint.relative(f).split("/")[0] for f in checkpoint.files})
        ]
        exported = set()
        for top in tops:
            exported |= {path for path in top.rglob("*") if not path.is_dir() or path.is_symlink()} | {top}
        exported -= {top for top in tops if top.is_dir() and not top.is_symlink()}
        if (
            exported != set(checkpoint.files)
            or any(path.is_symlink() for path in exported)
            or len(tops) > MAX_TASK_PATHS
        ):
            return None
        # Under RUNS_FOLDER (run_dir), which the association links to the bucket's prefix of the same name.
        folder = checkpoint.directory.relative_to(self.cluster["shared_dir"]).as_posix()
        return [f"{folder}/{top.name}" for top in tops]

    def _exporting_file_system(self, checkpoint: Checkpoint) -> str | None:
        """The cluster's FSx file system when an available association links its ``/runs`` to the bucket's
        ``runs/``; None (and why, in the log) otherwise."""
        file_system_id = self.cluster.get("fsx_file_system_id")
        if not file_system_id:
            return None
        wanted = f"s3://{checkpoint.bucket}/{RUNS_FOLDER}/"
        try:
            association = FsxHook(aws_conn_id=self.aws_conn_id).find_data_repository_association(
                file_system_id, f"/{RUNS_FOLDER}"
            )
        except ClientError as err:
            self.log.warning("Cannot read %s's data repository associations (%s): uploading", file_system_id, err)
            return None
        if association is None or association["DataRepositoryPath"].rstrip("/") != wanted.rstrip("/"):
            self.log.info(
                "%s's /%s is not linked to %s (%s): uploading from this worker. To have FSx export checkpoints, "
                "link them (aws fsx create-data-repository-association; the file system can no longer be backed up)",
                file_system_id, RUNS_FOLDER, wanted, association["DataRepositoryPath"] if association else "no link",
            )  # fmt: skip
            return None
        if association["Lifecycle"] != "AVAILABLE":
            self.log.warning(
                "The association %s of %s's /%s is %s: uploading from this worker",
                association["AssociationId"], file_system_id, RUNS_FOLDER, association["Lifecycle"],
            )  # fmt: skip
            return None
        return file_system_id
