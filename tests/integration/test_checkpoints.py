"""save_checkpoint: the newest checkpoint, from the shared directory to the emulator's artifacts bucket, whole
(a manifest written last) and once (a retry uploads nothing again); resume_source and restore_checkpoint: a later
run of the same framework and model starts from it, anything else is refused before the run creates anything."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from dtp.params import ParamsError
from dtp.pipeline.checkpoints import restore_checkpoint, resume_source, save_checkpoint
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
