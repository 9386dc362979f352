"""upload_checkpoint against moto's S3: a file the bucket holds with its size but other content (a tracker rewritten
from "100" to "300") is uploaded again; a file it holds as it is, single-part or multipart, is not. Every object of
the copy, uploaded, kept or exported by FSx, and its manifest carry the tag the bucket expires checkpoints by."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from dtp.pipeline.checkpoints import Checkpoint, etag, tag_checkpoint, upload_checkpoint, write_manifest
from dtp.pipeline.retention import checkpoint_kind

BUCKET = "dtp-artifacts-test"
PREFIX = "runs/dtp-run-0123456789/checkpoints/"
MIB = 1 << 20


@pytest.fixture
def s3(moto_aws) -> Any:
    client = moto_aws("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def checkpoint(directory: Path, kind: str = "checkpoint") -> Checkpoint:
    return Checkpoint(directory, None, sorted(p for p in directory.rglob("*") if p.is_file()), BUCKET, PREFIX, kind)


def stored(s3: Any, relative: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=PREFIX + relative)["Body"].read()


def tags(s3: Any, relative: str) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in s3.get_object_tagging(Bucket=BUCKET, Key=PREFIX + relative)["TagSet"]}


def test_a_file_rewritten_with_its_size_is_uploaded_again_and_an_unchanged_one_is_not(s3, tmp_path) -> None:
    tracker = write(tmp_path / "latest_checkpointed_iteration.txt", b"100")
    write(tmp_path / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt", b"\x01" * 64)
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default") == {"uploaded": 2, "uploaded_bytes": 67}
    # A later save: the tracker says 300 in as many bytes, next to the new iteration's files.
    tracker.write_bytes(b"300")
    write(tmp_path / "iter_0000300" / "mp_rank_00" / "model_optim_rng.pt", b"\x03" * 64)
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default") == {"uploaded": 2, "uploaded_bytes": 67}
    assert stored(s3, "latest_checkpointed_iteration.txt") == b"300"
    assert stored(s3, "iter_0000300/mp_rank_00/model_optim_rng.pt") == b"\x03" * 64
    # A retry finds every file stored as it is.
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default") == {"uploaded": 0, "uploaded_bytes": 0}


def test_a_multipart_file_is_compared_by_its_parts(s3, tmp_path) -> None:
    # Past boto3's 8 MiB multipart threshold: S3's ETag is the MD5 of the parts' MD5s, not the file's MD5.
    shard = write(tmp_path / "step_100" / "__0_0.distcp", b"\x01" * (9 * MIB))
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default")["uploaded"] == 1
    assert s3.head_object(Bucket=BUCKET, Key=PREFIX + "step_100/__0_0.distcp")["ETag"].endswith('-2"')
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default")["uploaded"] == 0
    with shard.open("r+b") as file:  # the same step trained again: its last part differs, its size does not
        file.seek(9 * MIB - 1)
        file.write(b"\x02")
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default") == {"uploaded": 1, "uploaded_bytes": 9 * MIB}
    assert stored(s3, "step_100/__0_0.distcp")[-2:] == b"\x01\x02"


def test_an_object_written_after_the_file_changed_is_its_copy_whatever_its_etag(s3, tmp_path) -> None:
    # An FSx export wrote it, with multipart ETags of its own part size: a retry after a partial export must not
    # send the whole checkpoint again from the worker.
    shard = write(tmp_path / "step_100" / "__0_0.distcp", b"\x01" * 64)
    os.utime(shard, (time.time() - 3600, time.time() - 3600))
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "step_100/__0_0.distcp", Body=b"\x09" * 64)  # an ETag no upload gives
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default")["uploaded"] == 0
    shard.write_bytes(b"\x02" * 64)  # changed since: compared by content, and uploaded
    assert upload_checkpoint(checkpoint(tmp_path), "aws_default")["uploaded"] == 1
    assert stored(s3, "step_100/__0_0.distcp") == b"\x02" * 64


@pytest.mark.parametrize("size", [0, 3, 8 * MIB - 1, 8 * MIB, 16 * MIB, 16 * MIB + 1])
def test_etag_is_the_one_s3_gives_the_uploaded_file(s3, tmp_path, size: int) -> None:
    path = write(tmp_path / "f", hashlib.sha256(str(size).encode()).digest() * (size // 32) + b"x" * (size % 32))
    s3.upload_file(str(path), BUCKET, "f")  # boto3's own transfer, as S3Hook.load_file uploads
    assert etag(path, 8 * MIB, 8 * MIB) == s3.head_object(Bucket=BUCKET, Key="f")["ETag"].strip('"')


CHECKPOINT_TAG = {"dtp:kind": "checkpoint"}


def test_every_object_of_the_copy_and_its_manifest_carry_the_checkpoint_tag(s3, tmp_path) -> None:
    write(tmp_path / "step_100" / "__0_0.distcp", b"\x01" * (9 * MIB))  # multipart: the tag goes with its creation
    write(tmp_path / "step_100" / ".metadata", b"\x02" * 64)
    kept = write(tmp_path / "step_100" / "__1_0.distcp", b"\x03" * 64)
    os.utime(kept, (time.time() - 3600, time.time() - 3600))
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "step_100/__1_0.distcp", Body=b"\x03" * 64)  # an earlier try's, untagged
    saved = checkpoint(tmp_path)
    assert upload_checkpoint(saved, "aws_default")["uploaded"] == 2
    spec = {"names": {"run_key": "dtp-run-0123456789"}, "recipe": {"framework": "fsdp", "model": "tiny"}}
    write_manifest(spec, saved, "aws_default")
    for relative in ("step_100/__0_0.distcp", "step_100/.metadata", "step_100/__1_0.distcp", "MANIFEST.json"):
        assert tags(s3, relative) == CHECKPOINT_TAG, relative


@pytest.mark.parametrize(
    ("run_type", "run_id", "kind"),
    [
        ("manual", "manual__2026-12-07T10:00:00+00:00", "checkpoint"),
        ("scheduled", "scheduled__2026-12-07T00:00:00+00:00", "regression-checkpoint"),
        ("backfill", "backfill__2026-12-01T00:00:00+00:00", "regression-checkpoint"),
        ("manual", "backfill_triggered__2026-12-07T10:00:00__2026-12-01", "regression-checkpoint"),
    ],
)
def test_a_regression_runs_checkpoint_expires_and_a_persons_is_kept(run_type: str, run_id: str, kind: str) -> None:
    assert checkpoint_kind({"run_type": run_type, "run_id": run_id}) == kind


def test_a_regression_runs_copy_carries_the_tag_that_expires_it(s3, tmp_path) -> None:
    write(tmp_path / "step_100" / ".metadata", b"\x02" * 64)
    upload_checkpoint(checkpoint(tmp_path, "regression-checkpoint"), "aws_default")
    assert tags(s3, "step_100/.metadata") == {"dtp:kind": "regression-checkpoint"}


def test_a_checkpoint_fsx_exported_is_tagged_whole(s3, tmp_path) -> None:
    write(tmp_path / "step_100" / "__0_0.distcp", b"\x01")
    write(tmp_path / "step_100" / ".metadata", b"\x02")
    for relative in ("step_100/__0_0.distcp", "step_100/.metadata"):  # as FSx writes them: without tags
        s3.put_object(Bucket=BUCKET, Key=PREFIX + relative, Body=b"\x00")
    s3.put_object(Bucket=BUCKET, Key="runs/dtp-other-run/checkpoints/step_1/x", Body=b"\x00")
    tag_checkpoint(checkpoint(tmp_path), "aws_default")
    assert tags(s3, "step_100/__0_0.distcp") == tags(s3, "step_100/.metadata") == CHECKPOINT_TAG
    assert s3.get_object_tagging(Bucket=BUCKET, Key="runs/dtp-other-run/checkpoints/step_1/x")["TagSet"] == []
