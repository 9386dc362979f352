"""stage_data: S3 (emulator) -> shared directory -> byte shard (or a framework's dataset), idempotent on retry (what it
and dataset_problem refuse: test_staging_refusals.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from botocore.client import BaseClient
from staging_support import (
    EXPIRES_AT,
    INDEX,
    INDEXED,
    MEGATRON,
    TORCHTITAN,
    TRAINER,
    bucket_holding,
    cluster_with_assets,
    megatron_dataset,
    run_spec,
)

from dtp.pipeline import data
from dtp.pipeline.data import SAMPLE_CORPUS, SharedFilesystemNotVisible, stage_data
from dtp.pipeline.frameworks import dataset_dir, datasets_cache_dir
from dtp.pipeline.mirror import mirror_dataset
from dtp.pipeline.run_dirs import RUN_MARKER

pytestmark = pytest.mark.stack
LATER = "2026-12-07T10:00:00Z"


def test_stage_sample_corpus_twice(stack, aws, tmp_path) -> None:
    bucket = bucket_holding(aws, {})
    spec = run_spec(bucket, TRAINER)
    cluster = cluster_with_assets(tmp_path, TRAINER)
    first = stage_data(spec, {"DataBucket": bucket}, cluster, "aws_default")
    size = SAMPLE_CORPUS.stat().st_size
    assert first["files"] == 1 and first["copied"] == 1 and first["bytes_moved"] == size
    assert first["tokens"] == size
    assert (tmp_path / "runs" / bucket / "train.bin").read_bytes() == SAMPLE_CORPUS.read_bytes()
    again = stage_data(spec, {"DataBucket": bucket}, cluster, "aws_default")
    assert again["copied"] == 0 and again["bytes_moved"] == 0 and again["tokens"] == size
    # What the reaper reads to remove the directory once the run has expired (the filesystem may outlive the run).
    marker = json.loads((tmp_path / "runs" / bucket / RUN_MARKER).read_text())
    assert marker == {"run_key": bucket, "dag_id": "train_e2e", "run_id": f"it__{bucket}", "expires_at": EXPIRES_AT}


def test_user_dataset_uri_and_empty_prefix(stack, aws, tmp_path) -> None:
    objects = {
        "corpus/a.txt": b"hello ",
        "corpus/b.txt": b"world",
        "corpus/skip.bin": b"\x00",
        # Beside the folder, not in it: s3://bucket/corpus means corpus/ alone.
        "corpus_v2/c.txt": b"!",
        "corpus-old.txt": b"?",
    }
    bucket = bucket_holding(aws, objects)
    cluster = cluster_with_assets(tmp_path, TRAINER)
    for uri in (f"s3://{bucket}/corpus/", f"s3://{bucket}/corpus"):
        staged = stage_data(run_spec("user", TRAINER, uri), {"DataBucket": "unused"}, cluster, "aws_default")
        assert staged["files"] == 2 and (tmp_path / "runs/user/train.bin").read_bytes() == b"hello world", uri
    empty = run_spec("user", TRAINER, f"s3://{bucket}/nothing/")
    with pytest.raises(ValueError, match=r"no \.txt objects under s3://"):
        stage_data(empty, {"DataBucket": "unused"}, cluster, "aws_default")


def test_a_shared_filesystem_this_worker_does_not_see_is_refused_before_any_copy(stack, aws, tmp_path) -> None:
    spec = run_spec("unseen", TRAINER)
    cluster = {"shared_dir": str(tmp_path / "fsx-not-mounted"), "slurm_conn_id": "slurm_default"}
    with pytest.raises(SharedFilesystemNotVisible, match=r"fsx-not-mounted, which this worker does not see"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not (tmp_path / "fsx-not-mounted").exists()


def test_a_framework_dataset_is_mirrored_where_its_job_reads_it(stack, aws, tmp_path) -> None:
    objects = {
        "megatron/train_text_document.bin": b"\x01" * 4096,
        "megatron/train_text_document.idx": INDEX,
        "megatron/tokenizer/tokenizer.json": b"{}",
    }
    bucket = bucket_holding(aws, objects)
    spec = run_spec("fw", MEGATRON, f"s3://{bucket}/megatron")
    cluster = cluster_with_assets(tmp_path, MEGATRON)

    staged = stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    dest = Path(dataset_dir(str(tmp_path), "megatron-lm", f"s3://{bucket}/megatron"))
    assert dest.parent == tmp_path / "datasets/megatron-lm"
    assert staged == {
        "source": f"s3://{bucket}/megatron",
        "files": 3,
        "copied": 3,
        "bytes_moved": sum(len(body) for body in objects.values()),
        "removed": 0,
        "dataset_dir": str(dest),
    }
    for key, body in objects.items():
        assert (dest / key.removeprefix("megatron/")).read_bytes() == body
    assert not list(dest.rglob("*.tmp"))
    # A retried task copies nothing again.
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 0


def test_each_run_leases_the_mirror_before_it_looks_at_it(stack, aws, tmp_path, monkeypatch) -> None:
    # Every run of the dataset shares the mirror: the reaper deletes it once every run that leased it has expired.
    spec, cluster, dest = megatron_dataset(aws, tmp_path, INDEXED)
    leases = tmp_path / "leases" / "datasets" / "megatron-lm" / dest.name
    leased_when_mirrored: list[list[str]] = []

    def mirror_noting_leases(*args, **kwargs):
        leased_when_mirrored.append(sorted(path.name for path in leases.iterdir()))
        return mirror_dataset(*args, **kwargs)

    monkeypatch.setattr(data, "mirror_dataset", mirror_noting_leases)
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    other = {**spec, "names": {"run_key": "fw-2"}, "run_id": "it__fw-2", "tags": {"dtp:expires-at": LATER}}
    stage_data(other, {"DataBucket": "unused"}, cluster, "aws_default")
    assert leased_when_mirrored == [["fw.json"], ["fw-2.json", "fw.json"]]
    assert json.loads((leases / "fw.json").read_text()) == {
        "run_key": "fw",
        "dag_id": "train_e2e",
        "run_id": "it__fw",
        "expires_at": EXPIRES_AT,
    }
    assert json.loads((leases / "fw-2.json").read_text())["expires_at"] == LATER


def test_a_torchtitan_run_leases_its_jobs_datasets_cache_beside_the_mirror(stack, aws, tmp_path) -> None:
    # datasets.load_dataset writes its Arrow copy of the mirror there: the reaper deletes it with the mirror's leases.
    bucket = bucket_holding(aws, {"t/train.jsonl": b'{"text": "hello"}\n'})
    spec = run_spec("tt", TORCHTITAN, f"s3://{bucket}/t/")
    cluster = cluster_with_assets(tmp_path, TORCHTITAN)
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    mirror = Path(dataset_dir(str(tmp_path), "torchtitan", f"s3://{bucket}/t/"))
    leases = tmp_path / "leases" / "datasets" / "torchtitan"
    assert (leases / mirror.name / "tt.json").is_file()
    assert (leases / Path(datasets_cache_dir(str(mirror))).name / "tt.json").is_file()


def test_an_object_uploaded_again_with_other_content_of_its_size_is_copied_again(stack, aws, tmp_path) -> None:
    spec, cluster, dest = megatron_dataset(aws, tmp_path, {**INDEXED, "tokenizer.json": b"{}"})
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 3
    time.sleep(1)  # S3's LastModified counts whole seconds
    bucket = spec["params"]["dataset_uri"].split("/")[2]
    aws("s3").put_object(Bucket=bucket, Key="m/train_text_document.bin", Body=b"\x02" * 4096)  # a fixed-size shard

    staged = stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert (staged["copied"], staged["bytes_moved"]) == (1, 4096)  # the unchanged objects are not copied again
    assert (dest / "train_text_document.bin").read_bytes() == b"\x02" * 4096
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 0
    # A file of the object's size that is not DTP's copy of it (written since, by anything) is copied over.
    (dest / "tokenizer.json").write_bytes(b"[]")
    staged = stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert staged["copied"] == 1 and (dest / "tokenizer.json").read_bytes() == b"{}"


@pytest.fixture
def s3_requests(monkeypatch) -> list[str]:
    """The operations boto3's clients ask of S3 from here on (this test's own included), in order."""
    requests: list[str] = []
    make_api_call = BaseClient._make_api_call

    def recorded(client: BaseClient, operation_name: str, api_params: dict) -> dict:
        if client.meta.service_model.service_name == "s3":
            requests.append(operation_name)
        return make_api_call(client, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", recorded)
    return requests


@pytest.mark.parametrize(
    ("recipe", "objects"),
    [(TRAINER, {"a.txt": b"hello ", "b.txt": b"world"}), (MEGATRON, {**INDEXED, "tokenizer.json": b"{}"})],
)
def test_a_dataset_staged_again_is_checked_against_its_listing_alone(
    stack, aws, tmp_path, s3_requests, recipe: dict, objects: dict[str, bytes]
) -> None:
    # The listing carries each object's size and LastModified: no request per object tells its copy is there.
    bucket = bucket_holding(aws, {f"d/{key}": body for key, body in objects.items()})
    spec = run_spec("requests", recipe, f"s3://{bucket}/d/")
    cluster = cluster_with_assets(tmp_path, recipe)
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == len(objects)
    s3_requests.clear()

    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 0
    assert s3_requests == ["ListObjectsV2"]


def test_a_text_object_uploaded_again_with_other_content_of_its_size_is_tokenized_again(stack, aws, tmp_path) -> None:
    bucket = bucket_holding(aws, {"corpus/a.txt": b"hello"})
    spec = run_spec("retext", TRAINER, f"s3://{bucket}/corpus/")
    cluster = cluster_with_assets(tmp_path, TRAINER)
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    time.sleep(1)  # S3's LastModified counts whole seconds
    aws("s3").put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"world")
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 1
    assert (tmp_path / "runs/retext/train.bin").read_bytes() == b"world"


def test_the_files_of_removed_objects_leave_the_mirror(stack, aws, tmp_path) -> None:
    objects = {**INDEXED, "shards/a.bin": b"a", "shards/b.bin": b"b", "tokenizer/vocab.json": b"{}"}
    spec, cluster, dest = megatron_dataset(aws, tmp_path, objects)
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    bucket = spec["params"]["dataset_uri"].split("/")[2]
    s3 = aws("s3")
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "m/shards/b.bin"}, {"Key": "m/tokenizer/vocab.json"}]})
    s3.put_object(Bucket=bucket, Key="m/tokenizer", Body=b"now a file")  # where a folder of removed objects was

    staged = stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert (staged["files"], staged["copied"], staged["removed"]) == (4, 1, 2)
    mirrored = sorted(path.relative_to(dest).as_posix() for path in dest.rglob("*") if path.is_file())
    assert mirrored == ["shards/a.bin", "tokenizer", "train_text_document.bin", "train_text_document.idx"]
    assert (dest / "tokenizer").read_bytes() == b"now a file"


def test_a_download_in_flight_stays_in_the_mirror_and_nothing_is_followed_out_of_it(stack, aws, tmp_path) -> None:
    spec, cluster, dest = megatron_dataset(aws, tmp_path, INDEXED)
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    # A concurrent run's downloads of an object this listing lacks: its temporary file and boto3's, being written.
    in_flight = [dest / ".new.bin.1a2b3c4d.tmp", dest / ".new.bin.1a2b3c4d.tmp.9F8e7D6c"]
    for path in in_flight:
        path.write_bytes(b"\x03")
    left_behind = dest / ".old.bin.5e6f7a8b.tmp"  # a download whose run is gone
    left_behind.write_bytes(b"\x04")
    hours_ago = time.time() - 3 * 3600
    os.utime(left_behind, (hours_ago, hours_ago))
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "file.bin").write_bytes(b"\x05")
    (outside / "folder" / "kept.bin").write_bytes(b"\x06")
    (dest / "link.bin").symlink_to(outside / "file.bin")
    (dest / "linked").symlink_to(outside / "folder")

    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["removed"] == 1
    assert not left_behind.exists()
    assert all(path.read_bytes() == b"\x03" for path in in_flight)
    assert (dest / "link.bin").is_symlink() and (dest / "linked").is_symlink()
    assert (outside / "file.bin").exists() and (outside / "folder" / "kept.bin").exists()
