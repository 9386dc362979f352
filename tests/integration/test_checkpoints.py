"""save_checkpoint: the newest checkpoint, from the shared directory to the emulator's artifacts bucket, whole
(a manifest written last) and once (a retry uploads nothing again)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from dtp.pipeline.checkpoints import save_checkpoint
from dtp.pipeline.results import artifacts_bucket

pytestmark = pytest.mark.stack


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def run(tmp_path: Path, framework: str) -> tuple[dict[str, Any], dict[str, str], Path]:
    run_key = f"it-ckpt-{uuid.uuid4().hex[:8]}"
    spec = {"names": {"run_key": run_key}, "recipe": {"framework": framework}}
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
