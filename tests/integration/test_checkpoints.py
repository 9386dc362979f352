"""SaveCheckpointOperator: the newest checkpoint, from the shared directory to the emulator's artifacts bucket, whole
(a manifest written last) and once (a retry uploads nothing again); resume_source and restore_checkpoint: a later
run of the same framework and model starts from it, anything else is refused before the run creates anything."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from botocore.stub import Stubber

import dtp.operators.checkpoints as checkpoint_operators
import dtp.operators.fsx as fsx_operators
from dtp.form_params import ParamsError
from dtp.hooks.fsx import FsxHook
from dtp.operators.checkpoints import SaveCheckpointOperator
from dtp.operators.fsx import TASK_KEY_TAG, task_key
from dtp.pipeline.checkpoints import restore_checkpoint, resume_source
from dtp.pipeline.results import artifacts_bucket

pytestmark = pytest.mark.stack


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def run(
    tmp_path: Path, framework: str, model: str = "tiny", **params: Any
) -> tuple[dict[str, Any], dict[str, str], Path]:
    run_key = f"it-ckpt-{uuid.uuid4().hex[:8]}"
    spec = {
        "names": {"run_key": run_key},
        "recipe": {"name": f"{model}_{framework}", "framework": framework, "model": model},
        "params": {"resume_from": "", "max_steps": 300, **params},
    }
    cluster = {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"}
    return spec, cluster, tmp_path / "runs" / run_key / "checkpoints"


def save_checkpoint(spec: dict[str, Any], cluster: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """The save_checkpoint task, on a cluster without FSx: this worker uploads."""
    return SaveCheckpointOperator(
        task_id="save_checkpoint", spec=spec, cluster=cluster, aws_conn_id=aws_conn_id
    ).execute({})


def objects(aws: Any, uri: str) -> dict[str, int]:
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    listed = aws("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {obj["Key"].removeprefix(prefix): obj["Size"] for obj in listed}


def test_the_trainers_newest_whole_step_is_saved_once(stack, aws, tmp_path) -> None:
    spec, cluster, checkpoints = run(tmp_path, "fsdp")
    write(checkpoints / "step_90" / "__0_0.distcp", b"\x00" * 10)
    write(checkpoints / "step_100" / "__0_0.distcp", b"\x01" * 300)
    write(checkpoints / "step_100" / "__1_0.distcp", b"\x02" * 200)
    write(checkpoints / "step_100" / "meta.json", b'{"step": 100}')
    write(checkpoints / "tmp-step_110" / "__0_0.distcp", b"\x03" * 50)  # a save cut short
    saved = save_checkpoint(spec, cluster, "aws_default")
    assert saved["uri"] == f"s3://{artifacts_bucket('aws_default')}/runs/{spec['names']['run_key']}/checkpoints/"
    assert (saved["saved"], saved["step"], saved["files"], saved["bytes"], saved["uploaded"]) == (True, 100, 3, 513, 3)
    stored = objects(aws, saved["uri"])
    assert {key: size for key, size in stored.items() if key != "MANIFEST.json"} == {
        "step_100/__0_0.distcp": 300,
        "step_100/__1_0.distcp": 200,
        "step_100/meta.json": 13,
    }
    bucket, prefix = saved["uri"].removeprefix("s3://").split("/", 1)
    manifest = json.loads(aws("s3").get_object(Bucket=bucket, Key=prefix + "MANIFEST.json")["Body"].read())
    assert manifest["step"] == 100 and manifest["bytes"] == 513
    assert [entry["path"] for entry in manifest["files"]] == sorted(k for k in stored if k != "MANIFEST.json")
    again = save_checkpoint(spec, cluster, "aws_default")  # a retried task
    assert (again["uploaded"], again["uploaded_bytes"], again["files"]) == (0, 0, 3)


def test_another_frameworks_checkpoint_folder_is_saved_less_unfinished_folders(stack, aws, tmp_path) -> None:
    spec, cluster, checkpoints = run(tmp_path, "megatron-lm")
    write(checkpoints / "latest_checkpointed_iteration.txt", b"200")
    write(checkpoints / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt", b"\x00" * 64)
    write(checkpoints / "tmp_iter_0000300" / "mp_rank_00" / "model_optim_rng.pt", b"\x00" * 64)
    saved = save_checkpoint(spec, cluster, "aws_default")
    assert saved["step"] is None and saved["files"] == 2
    assert set(objects(aws, saved["uri"])) == {
        "latest_checkpointed_iteration.txt",
        "iter_0000200/mp_rank_00/model_optim_rng.pt",
        "MANIFEST.json",
    }


def test_a_file_a_later_save_rewrote_with_its_size_is_saved_again(stack, aws, tmp_path) -> None:
    spec, cluster, checkpoints = run(tmp_path, "megatron-lm")
    write(checkpoints / "latest_checkpointed_iteration.txt", b"100")
    write(checkpoints / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt", b"\x01" * 64)
    assert save_checkpoint(spec, cluster, "aws_default")["uploaded"] == 2
    # The run saved again: the tracker says 300, in as many bytes as it said 100.
    write(checkpoints / "latest_checkpointed_iteration.txt", b"300")
    write(checkpoints / "iter_0000300" / "mp_rank_00" / "model_optim_rng.pt", b"\x03" * 64)
    saved = save_checkpoint(spec, cluster, "aws_default")
    assert (saved["uploaded"], saved["uploaded_bytes"]) == (2, 67)  # the tracker and the new iteration's file
    bucket, prefix = saved["uri"].removeprefix("s3://").split("/", 1)
    tracker = aws("s3").get_object(Bucket=bucket, Key=prefix + "latest_checkpointed_iteration.txt")["Body"].read()
    assert tracker == b"300"
    assert save_checkpoint(spec, cluster, "aws_default")["uploaded"] == 0  # a retry: all stored as they are


def test_a_run_that_wrote_no_checkpoint_saves_nothing(stack, aws, tmp_path) -> None:
    spec, cluster, checkpoints = run(tmp_path, "fsdp")
    write(checkpoints / "tmp-step_10" / "__0_0.distcp", b"\x00")  # it failed while saving its first one
    assert save_checkpoint(spec, cluster, "aws_default") == {"saved": False, "checkpoint_dir": str(checkpoints)}


def saved_trainer_checkpoint(aws: Any, tmp_path: Path) -> dict[str, Any]:
    spec, cluster, checkpoints = run(tmp_path, "fsdp")
    write(checkpoints / "step_100" / "__0_0.distcp", b"\x01" * 300)
    write(checkpoints / "step_100" / "meta.json", b'{"step": 100}')
    return save_checkpoint(spec, cluster, "aws_default")


def test_a_later_run_resumes_from_a_saved_checkpoint(stack, aws, tmp_path) -> None:
    saved = saved_trainer_checkpoint(aws, tmp_path)
    spec, cluster, checkpoints = run(tmp_path, "fsdp", resume_from=saved["uri"].rstrip("/"), max_steps=400)
    spec["resume"] = resume_source(spec, "aws_default")
    assert spec["resume"] == {"uri": saved["uri"], "step": 100, "files": 2, "bytes": 313,
                              "from_run": saved["uri"].split("/runs/")[1].split("/")[0]}  # fmt: skip
    restored = restore_checkpoint(spec, cluster, "aws_default")
    assert (restored["copied"], restored["bytes_moved"]) == (2, 313)
    assert (checkpoints / "step_100" / "__0_0.distcp").read_bytes() == b"\x01" * 300
    assert (checkpoints / "step_100" / "meta.json").read_text() == '{"step": 100}'
    assert restore_checkpoint(spec, cluster, "aws_default")["copied"] == 0  # a retried stage_data


def test_a_checkpoint_file_gone_since_its_manifest_is_named_and_nothing_is_copied(stack, aws, tmp_path) -> None:
    saved = saved_trainer_checkpoint(aws, tmp_path)
    spec, cluster, checkpoints = run(tmp_path, "fsdp", resume_from=saved["uri"], max_steps=400)
    spec["resume"] = resume_source(spec, "aws_default")
    bucket, key = saved["uri"].removeprefix("s3://").split("/", 1)
    aws("s3").delete_object(Bucket=bucket, Key=f"{key}step_100/__0_0.distcp")
    with pytest.raises(FileNotFoundError, match=r"names files that are gone: step_100/__0_0.distcp"):
        restore_checkpoint(spec, cluster, "aws_default")
    assert not checkpoints.exists() or not any(checkpoints.rglob("*"))


def test_a_run_without_resume_from_reads_nothing(stack) -> None:
    spec, _, _ = run(Path("/nonexistent"), "fsdp")
    assert resume_source(spec, "aws_default") is None


@pytest.mark.parametrize(
    ("framework", "model", "max_steps", "message"),
    [
        ("megatron-lm", "tiny", 400, "resume_from: it holds a framework 'fsdp' checkpoint; recipe 'tiny_megatron-lm' "
         "trains 'megatron-lm'"),
        ("fsdp", "llama3_2_1b", 400, "resume_from: it holds a model 'tiny' checkpoint"),
        ("fsdp", "tiny", 100, "resume_from: its step 100 is not before max_steps (100): there would be nothing"),
    ],
)  # fmt: skip
def test_a_checkpoint_the_run_cannot_resume_from_is_refused(
    stack, aws, tmp_path, framework: str, model: str, max_steps: int, message: str
) -> None:
    saved = saved_trainer_checkpoint(aws, tmp_path)
    spec, _, _ = run(tmp_path, framework, model, resume_from=saved["uri"], max_steps=max_steps)
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resume_source(spec, "aws_default")


def test_a_prefix_without_a_whole_copy_is_refused(stack, aws, tmp_path) -> None:
    bucket = artifacts_bucket("aws_default")
    aws("s3").put_object(Bucket=bucket, Key="runs/half-copied/checkpoints/step_5/__0_0.distcp", Body=b"\x00")
    spec, _, _ = run(tmp_path, "fsdp", resume_from=f"s3://{bucket}/runs/half-copied/checkpoints/")
    with pytest.raises(ParamsError, match=r"resume_from: no MANIFEST.json under s3://.*/runs/half-copied/checkpoints/"):
        resume_source(spec, "aws_default")


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"{not json", "manifest: Invalid JSON"),
        (b'{"run_key": "r", "framework": "fsdp", "model": "tiny", "step": 5, "bytes": 1}', "files: Field required"),
        (b'{"run_key": "r", "framework": "fsdp", "model": "tiny", "step": "five", "bytes": 1, "files": []}', "step: "),
        # A path restore_checkpoint would write outside the new run's checkpoint folder: refused before it exists.
        (
            b'{"run_key": "r", "framework": "fsdp", "model": "tiny", "step": 5, "bytes": 1, "files": [{"path": '
            b'"../../../etc/cron.d/x", "bytes": 1}]}',
            "files.0.path: Value error, got '../../../etc/cron.d/x'; expected a relative path below the checkpoint",
        ),
    ],
)
def test_a_manifest_that_is_not_one_is_refused_by_what_is_wrong(stack, aws, tmp_path, manifest, message) -> None:
    bucket = artifacts_bucket("aws_default")
    prefix = f"runs/not-a-manifest-{uuid.uuid4().hex[:6]}/checkpoints/"
    aws("s3").put_object(Bucket=bucket, Key=prefix + "MANIFEST.json", Body=manifest)
    spec, _, _ = run(tmp_path, "fsdp", resume_from=f"s3://{bucket}/{prefix}")
    where = f"s3://{bucket}/{prefix}MANIFEST.json"
    with pytest.raises(ParamsError, match=re.escape(f"{where} is not a manifest save_checkpoint wrote ({message}")):
        resume_source(spec, "aws_default")


# On FSx: the file system cannot run here, so botocore's Stubber answers FSx (every request checked against its
# service model) while S3 is the emulator's. The Stubber refuses any call it was not told to expect.
FS = "fs-0123456789abcdef0"


@pytest.fixture
def fsx(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    hook = FsxHook(aws_conn_id=None, region_name="us-east-1")
    hook.conn = hook.get_client_type(region_name="us-east-1")
    monkeypatch.setattr(checkpoint_operators, "FsxHook", lambda **_: hook)
    monkeypatch.setattr(fsx_operators, "FsxHook", lambda **_: hook)
    with Stubber(hook.conn) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def on_fsx(tmp_path: Path) -> tuple[dict[str, Any], dict[str, str], Path]:
    spec, cluster, checkpoints = run(tmp_path, "fsdp")
    spec["tags"] = {"dtp:run": spec["names"]["run_key"]}
    write(checkpoints / "step_50" / "__0_0.distcp", b"\x00" * 10)
    write(checkpoints / "step_100" / "__0_0.distcp", b"\x01" * 300)
    write(checkpoints / "step_100" / "meta.json", b'{"step": 100}')
    return spec, {**cluster, "fsx_file_system_id": FS}, checkpoints


def association(lifecycle: str, repository: str) -> dict[str, Any]:
    return {"AssociationId": "dra-0123456789abcdef0", "FileSystemId": FS, "Lifecycle": lifecycle,
            "FileSystemPath": "/runs", "DataRepositoryPath": repository}  # fmt: skip


def expect_association(fsx: Stubber, lifecycle: str) -> None:
    linked = association(lifecycle, f"s3://{artifacts_bucket('aws_default')}/runs/")
    fsx.add_response("describe_data_repository_associations", {"Associations": [linked]})


def ti(try_number: int = 1) -> SimpleNamespace:
    return SimpleNamespace(dag_id="train_e2e", run_id="r", task_id="save_checkpoint", map_index=-1,
                           try_number=try_number)  # fmt: skip


def export_event(lifecycle: str, failed: int) -> dict[str, Any]:
    """What FsxDataRepositoryTaskTrigger fires once the export of the two files ends."""
    return {"status": "success" if lifecycle == "SUCCEEDED" else "failed", "task_id": "task-0123456789abcdef1",
            "lifecycle": lifecycle, "total": 2, "succeeded": 2 - failed, "failed": failed, "released_bytes": 0,
            "failure": f"{failed} files failed" if failed else "", "report_path": "s3://r/report"}  # fmt: skip


def operator(spec: dict[str, Any], cluster: dict[str, Any]) -> SaveCheckpointOperator:
    return SaveCheckpointOperator(task_id="save_checkpoint", spec=spec, cluster=cluster, aws_conn_id="aws_default")


def test_on_fsx_the_file_system_exports_the_newest_step_and_the_manifest_follows(stack, aws, fsx, tmp_path) -> None:
    spec, cluster, _ = on_fsx(tmp_path)
    run_key, bucket = spec["names"]["run_key"], artifacts_bucket("aws_default")
    expect_association(fsx, "AVAILABLE")
    fsx.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": []})
    task = {"TaskId": "task-0123456789abcdef1", "Lifecycle": "PENDING", "Type": "EXPORT_TO_REPOSITORY",
            "CreationTime": datetime.now(UTC), "FileSystemId": FS}  # fmt: skip
    fsx.add_response(
        "create_data_repository_task",
        {"DataRepositoryTask": task},
        {
            "Type": "EXPORT_TO_REPOSITORY",
            "FileSystemId": FS,
            "Paths": [f"runs/{run_key}/checkpoints/step_100"],  # relative to the mount: the newest whole step only
            "Report": {
                "Enabled": True,
                "Path": f"s3://{bucket}/runs/{run_key}/fsx-export-report",
                "Format": "REPORT_CSV_20191124",
                "Scope": "FAILED_FILES_ONLY",
            },
            "ClientRequestToken": f"{task_key(ti())}-1",
            "Tags": [{"Key": "dtp:run", "Value": run_key}, {"Key": TASK_KEY_TAG, "Value": task_key(ti())}],
        },
    )
    with pytest.raises(TaskDeferred) as deferred:
        operator(spec, cluster).execute({"ti": ti()})
    assert deferred.value.trigger.repository_task_id == "task-0123456789abcdef1"
    prefix = f"s3://{bucket}/runs/{run_key}/checkpoints/"
    assert objects(aws, prefix) == {}  # the worker uploads nothing, and no manifest before the export ends

    exported = {"step_100/__0_0.distcp": b"\x01" * 300, "step_100/meta.json": b'{"step": 100}'}
    for relative, body in exported.items():  # as FSx writes them: without tags
        aws("s3").put_object(Bucket=bucket, Key=f"runs/{run_key}/checkpoints/{relative}", Body=body)
    saved = operator(spec, cluster).execute_complete({}, export_event("SUCCEEDED", failed=0))
    assert saved == {"saved": True, "uri": prefix, "step": 100, "files": 2, "bytes": 313,
                     "exported_by": "task-0123456789abcdef1"}  # fmt: skip
    assert set(objects(aws, prefix)) == {"MANIFEST.json", *exported}  # the worker wrote only the manifest
    for relative in ("MANIFEST.json", *exported):  # and tagged the export, for the bucket to expire it
        tagging = aws("s3").get_object_tagging(Bucket=bucket, Key=f"runs/{run_key}/checkpoints/{relative}")
        assert tagging["TagSet"] == [{"Key": "dtp:kind", "Value": "checkpoint"}], relative


def test_a_failed_export_is_uploaded_by_the_worker_instead(stack, aws, fsx, tmp_path) -> None:
    spec, cluster, _ = on_fsx(tmp_path)
    saved = operator(spec, cluster).execute_complete({}, export_event("FAILED", failed=1))
    assert (saved["saved"], saved["uploaded"], saved["uploaded_bytes"], saved["step"]) == (True, 2, 313, 100)
    assert set(objects(aws, saved["uri"])) == {"step_100/__0_0.distcp", "step_100/meta.json", "MANIFEST.json"}


def test_an_export_stopped_at_its_deadline_is_cancelled_and_uploaded_instead(stack, aws, fsx, tmp_path) -> None:
    spec, cluster, _ = on_fsx(tmp_path)
    cancelled = {"TaskId": "task-0123456789abcdef1", "Lifecycle": "CANCELING"}
    fsx.add_response("cancel_data_repository_task", cancelled, {"TaskId": "task-0123456789abcdef1"})
    late = export_event("EXECUTING", failed=0) | {"status": "failed", "failure": "still EXECUTING after 10800 s"}
    saved = operator(spec, cluster).execute_complete({}, late)
    assert (saved["saved"], saved["uploaded"]) == (True, 2)


def test_an_export_fsx_will_not_start_is_uploaded_instead(stack, aws, fsx, tmp_path) -> None:
    spec, cluster, _ = on_fsx(tmp_path)
    expect_association(fsx, "AVAILABLE")
    fsx.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": []})
    fsx.add_client_error("create_data_repository_task", "DataRepositoryTaskExecuting", "another task is running")
    saved = operator(spec, cluster).execute({"ti": ti()})
    assert (saved["saved"], saved["uploaded"]) == (True, 2) and "exported_by" not in saved


@pytest.mark.parametrize(
    "linked",
    [None, association("AVAILABLE", "s3://another-bucket/runs/"), "FAILED"],
    ids=["not-linked", "linked-elsewhere", "failed-association"],
)
def test_a_file_system_without_a_working_link_is_uploaded_from_and_left_as_it_is(
    stack, aws, fsx, tmp_path, linked
) -> None:
    # DTP never links a file system itself (a linked one can no longer be backed up): the Stubber would refuse a
    # CreateDataRepositoryAssociation it was not told to expect.
    spec, cluster, _ = on_fsx(tmp_path)
    if linked == "FAILED":
        expect_association(fsx, "FAILED")
    else:
        fsx.add_response("describe_data_repository_associations", {"Associations": [linked] if linked else []})
    saved = operator(spec, cluster).execute({"ti": ti()})
    assert (saved["saved"], saved["uploaded"]) == (True, 2)


def test_a_checkpoint_folder_holding_what_the_manifest_leaves_out_is_uploaded(stack, aws, fsx, tmp_path) -> None:
    # Exporting iter_0000200/ whole would copy its unfinished tmp folder too, which the manifest does not list.
    spec, cluster, checkpoints = run(tmp_path, "megatron-lm")
    spec["tags"] = {"dtp:run": spec["names"]["run_key"]}
    write(checkpoints / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt", b"\x00" * 64)
    write(checkpoints / "iter_0000200" / "tmp_shard" / "part.pt", b"\x00" * 8)
    expect_association(fsx, "AVAILABLE")
    saved = operator(spec, {**cluster, "fsx_file_system_id": FS}).execute({"ti": ti()})
    assert (saved["files"], saved["uploaded"]) == (1, 1)
