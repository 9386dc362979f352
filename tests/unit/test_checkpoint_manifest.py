"""resume_source against moto's S3: a manifest whose paths would be written outside the new run's checkpoint folder
is refused while validate_params reads it, before the run creates anything, and so is a checkpoint the artifacts
bucket has deleted (all of it, or the files before their manifest), saying it may have expired."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dtp.form_params import ParamsError
from dtp.pipeline.checkpoints import resume_source
from dtp.pipeline.retention import CHECKPOINT_DAYS

BUCKET = "dtp-artifacts-test"
PREFIX = "runs/dtp-run-0123456789/checkpoints/"
SPEC = {
    "recipe": {"name": "tiny_megatron-lm", "framework": "megatron-lm", "model": "tiny"},
    "params": {"resume_from": f"s3://{BUCKET}/{PREFIX}", "max_steps": 300},
}


def saved(moto_aws: Any, *paths: str) -> Any:
    """A manifest of ``paths`` in moto's bucket (their files are not); the client."""
    manifest = {"run_key": "dtp-run-0123456789", "framework": "megatron-lm", "model": "tiny", "step": None,
                "bytes": len(paths), "files": [{"path": path, "bytes": 1} for path in paths]}  # fmt: skip
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "MANIFEST.json", Body=json.dumps(manifest).encode())
    return s3


def store(s3: Any, *paths: str) -> None:
    for path in paths:
        s3.put_object(Bucket=BUCKET, Key=PREFIX + path, Body=b"\x00")


def test_a_manifest_of_plain_relative_paths_is_accepted(moto_aws) -> None:
    paths = ("latest_checkpointed_iteration.txt", "iter_0000100/mp_rank_00/model_optim_rng.pt", "..hidden")
    store(saved(moto_aws, *paths), *paths)
    assert resume_source(SPEC, "aws_default") == {"uri": f"s3://{BUCKET}/{PREFIX}", "step": None, "files": 3,
                                                  "bytes": 3, "from_run": "dtp-run-0123456789"}  # fmt: skip


@pytest.mark.parametrize(
    "path",
    ["../../../etc/cron.d/x", "/etc/cron.d/x", "iter_1/../../x", "./x", "a//b", "", ".", "a/", "a\\..\\..\\x", "a\0b"],
)
def test_a_manifest_path_leaving_the_checkpoint_folder_is_refused_up_front(moto_aws, path: str) -> None:
    saved(moto_aws, "latest_checkpointed_iteration.txt", path)
    message = (
        f"invalid parameters:\nresume_from: s3://{BUCKET}/{PREFIX}MANIFEST.json is not a manifest save_checkpoint "
        f"wrote (files.1.path: Value error, got {path!r}; expected a relative path below the checkpoint folder: not "
        "absolute, no empty, '.' or '..' segment, no backslash or NUL)"
    )
    with pytest.raises(ParamsError, match=f"^{re.escape(message)}$"):
        resume_source(SPEC, "aws_default")


def test_a_checkpoint_whose_manifest_is_gone_is_refused_saying_it_may_have_expired(moto_aws) -> None:
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    store(s3, "latest_checkpointed_iteration.txt")  # a file written the day after its manifest outlives it
    message = (
        f"resume_from: no MANIFEST.json under s3://{BUCKET}/{PREFIX}: not a checkpoint saved by a run's "
        "save_checkpoint, its copy did not finish, or it has expired (the artifacts bucket deletes a "
        f"regression run's checkpoint {CHECKPOINT_DAYS} days after it was saved)"
    )
    with pytest.raises(ParamsError, match=re.escape(message)):
        resume_source(SPEC, "aws_default")


def test_a_manifest_whose_files_are_gone_is_refused_before_the_run_creates_anything(moto_aws) -> None:
    """The bucket deletes the files of a copy whose upload went past midnight a day before its manifest: the
    manifest alone must not pass validate_params, for restore_checkpoint to fail once the cluster exists."""
    paths = ("latest_checkpointed_iteration.txt", "iter_0000100/mp_rank_00/model_optim_rng.pt", "iter_0000100/x")
    store(saved(moto_aws, *paths), paths[0])
    message = (
        "resume_from: 2 of the 3 files its MANIFEST.json lists are gone (iter_0000100/mp_rank_00/model_optim_rng.pt, "
        f"iter_0000100/x): it may have expired (the artifacts bucket deletes a regression run's checkpoint "
        f"{CHECKPOINT_DAYS} days after it was saved)"
    )
    with pytest.raises(ParamsError, match=re.escape(message)):
        resume_source(SPEC, "aws_default")
