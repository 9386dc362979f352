"""resume_source against moto's S3: a manifest whose paths would be written outside the new run's checkpoint folder
is refused while validate_params reads it, before the run creates anything."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dtp.form_params import ParamsError
from dtp.pipeline.checkpoints import resume_source

BUCKET = "dtp-artifacts-test"
PREFIX = "runs/dtp-run-0123456789/checkpoints/"
SPEC = {
    "recipe": {"name": "tiny_megatron-lm", "framework": "megatron-lm", "model": "tiny"},
    "params": {"resume_from": f"s3://{BUCKET}/{PREFIX}", "max_steps": 300},
}


def saved(moto_aws: Any, *paths: str) -> None:
    manifest = {"run_key": "dtp-run-0123456789", "framework": "megatron-lm", "model": "tiny", "step": None,
                "bytes": len(paths), "files": [{"path": path, "bytes": 1} for path in paths]}  # fmt: skip
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "MANIFEST.json", Body=json.dumps(manifest).encode())


def test_a_manifest_of_plain_relative_paths_is_accepted(moto_aws) -> None:
    saved(moto_aws, "latest_checkpointed_iteration.txt", "iter_0000100/mp_rank_00/model_optim_rng.pt", "..hidden")
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
