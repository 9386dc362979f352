"""stage_data: S3 (emulator) -> shared directory -> byte shard (or a framework's dataset), idempotent on retry."""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.client import BaseClient

from dtp.pipeline import data
from dtp.pipeline.data import SAMPLE_CORPUS, SharedFilesystemNotVisible, dataset_problem, stage_data
from dtp.pipeline.frameworks import ASSET_FILES, dataset_dir, datasets_cache_dir, hf_config_shape
from dtp.pipeline.mirror import mirror_dataset
from dtp.pipeline.run_dirs import RUN_MARKER
from dtp.pipeline.s3_objects import NoRoomToCopy

pytestmark = pytest.mark.stack
TRAINER: dict[str, Any] = {"framework": "fsdp", "model": "tiny", "seq_len": 4}
MEGATRON = {"framework": "megatron-lm", "model": "llama3_1_70b"}
TORCHTITAN = {"framework": "torchtitan", "model": "llama3_1_8b"}
NEURONX = {"framework": "neuronx-distributed", "model": "llama3_1_8b"}
PICOTRON = {"framework": "picotron", "model": "llama3_2_1b"}
EXPIRES_AT = "2026-12-06T10:00:00Z"
LATER = "2026-12-07T10:00:00Z"


def run_spec(run_key: str, recipe: dict, dataset_uri: str = "") -> dict:
    return {
        "dag_id": "train_e2e",
        "run_id": f"it__{run_key}",
        "params": {"dataset_uri": dataset_uri},
        "names": {"run_key": run_key},
        "recipe": recipe,
        "tags": {"dtp:expires-at": EXPIRES_AT},
    }


def megatron_index(type_code: int) -> bytes:
    """The start of a Megatron-LM index (core_v0.12.1's indexed_dataset.py) whose .bin stores token ids of type
    ``type_code`` (4: int32, 8: uint16), and its first counts."""
    return b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, type_code) + struct.pack("<QQ", 1, 1)


INDEX = megatron_index(4)


def cluster_with_assets(shared_dir: Path, recipe: dict) -> dict:
    """A cluster whose shared filesystem is ``shared_dir``, holding the Hugging Face files that ``recipe``'s
    framework loads, of its model, where the framework reads them (DTP's trainer reads none)."""
    if recipe["framework"] in ASSET_FILES:
        assets = shared_dir / "assets" / recipe["model"]
        assets.mkdir(parents=True, exist_ok=True)
        for name in ASSET_FILES[recipe["framework"]]:
            (assets / name).write_text("{}")
        (assets / "config.json").write_text(json.dumps({"model_type": "llama", **hf_config_shape(recipe["model"])}))
    return {"shared_dir": str(shared_dir), "slurm_conn_id": "slurm_default"}


def test_stage_sample_corpus_twice(stack, aws, tmp_path) -> None:
    bucket = f"dtp-it-stage-{uuid.uuid4().hex[:8]}"
    aws("s3").create_bucket(Bucket=bucket)
    spec = run_spec(bucket, TRAINER)
    cluster = {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"}
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
    s3 = aws("s3")
    bucket = f"dtp-it-user-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"hello ")
    s3.put_object(Bucket=bucket, Key="corpus/b.txt", Body=b"world")
    s3.put_object(Bucket=bucket, Key="corpus/skip.bin", Body=b"\x00")
    # Beside the folder, not in it: s3://bucket/corpus means corpus/ alone.
    s3.put_object(Bucket=bucket, Key="corpus_v2/c.txt", Body=b"!")
    s3.put_object(Bucket=bucket, Key="corpus-old.txt", Body=b"?")
    for uri in (f"s3://{bucket}/corpus/", f"s3://{bucket}/corpus"):
        spec = run_spec("user", TRAINER, uri)
        cluster = {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"}
        staged = stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
        assert staged["files"] == 2 and (tmp_path / "runs/user/train.bin").read_bytes() == b"hello world", uri
    empty = run_spec("user", TRAINER, f"s3://{bucket}/nothing/")
    with pytest.raises(ValueError, match=r"no \.txt objects under s3://"):
        stage_data(
            empty,
            {"DataBucket": "unused"},
            {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"},
            "aws_default",
        )


def test_a_shared_filesystem_this_worker_does_not_see_is_refused_before_any_copy(stack, aws, tmp_path) -> None:
    spec = run_spec("unseen", TRAINER)
    cluster = {"shared_dir": str(tmp_path / "fsx-not-mounted"), "slurm_conn_id": "slurm_default"}
    with pytest.raises(SharedFilesystemNotVisible, match=r"fsx-not-mounted, which this worker does not see"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not (tmp_path / "fsx-not-mounted").exists()


def test_a_framework_dataset_is_mirrored_where_its_job_reads_it(stack, aws, tmp_path) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-megatron-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    objects = {
        "megatron/train_text_document.bin": b"\x01" * 4096,
        "megatron/train_text_document.idx": INDEX,
        "megatron/tokenizer/tokenizer.json": b"{}",
    }
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
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


def megatron_dataset(aws, tmp_path: Path, objects: dict[str, bytes]) -> tuple[dict, dict, Path]:
    """A bucket holding ``objects`` under ``m/``, a Megatron-LM run reading it, its cluster, and the mirror's path."""
    s3 = aws("s3")
    bucket = f"dtp-it-mirror-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"m/{key}", Body=body)
    spec = run_spec("fw", MEGATRON, f"s3://{bucket}/m/")
    cluster = cluster_with_assets(tmp_path, MEGATRON)
    return spec, cluster, Path(dataset_dir(str(tmp_path), "megatron-lm", f"s3://{bucket}/m/"))


INDEXED = {"train_text_document.bin": b"\x01" * 4096, "train_text_document.idx": INDEX}


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
    s3 = aws("s3")
    bucket = f"dtp-it-cache-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="t/train.jsonl", Body=b'{"text": "hello"}\n')
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
    bucket = f"dtp-it-requests-{uuid.uuid4().hex[:8]}"
    aws("s3").create_bucket(Bucket=bucket)
    for key, body in objects.items():
        aws("s3").put_object(Bucket=bucket, Key=f"d/{key}", Body=body)
    spec = run_spec("requests", recipe, f"s3://{bucket}/d/")
    cluster = cluster_with_assets(tmp_path, recipe)
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == len(objects)
    s3_requests.clear()

    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 0
    assert s3_requests == ["ListObjectsV2"]


def test_a_text_object_uploaded_again_with_other_content_of_its_size_is_tokenized_again(stack, aws, tmp_path) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-retext-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"hello")
    spec = run_spec("retext", TRAINER, f"s3://{bucket}/corpus/")
    cluster = {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"}
    stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    time.sleep(1)  # S3's LastModified counts whole seconds
    s3.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"world")
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


def test_a_framework_dataset_without_its_index_is_refused_before_any_copy(stack, aws, tmp_path) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-noidx-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="m/train_text_document.bin", Body=b"\x01")
    spec = run_spec("fw", MEGATRON, f"s3://{bucket}/m/")
    cluster = cluster_with_assets(tmp_path, MEGATRON)
    with pytest.raises(ValueError, match=r"m/ lacks train_text_document\.idx \(megatron-lm reads an indexed dataset "):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not (tmp_path / "datasets").exists()


def test_nemo_stages_nothing_and_refuses_a_dataset_it_would_not_read(tmp_path) -> None:
    spec = run_spec("n", {"framework": "nemo"})
    cluster = {"shared_dir": str(tmp_path / "not-even-mounted"), "slurm_conn_id": "slurm_default"}
    assert stage_data(spec, {}, cluster, "aws_default")["files"] == 0
    problem = dataset_problem(run_spec("n", {"framework": "nemo"}, "s3://bucket/data/"), "aws_default")
    assert problem is not None and "NeMo's recipes train on synthetic tokens and read no dataset" in problem


def test_a_dataset_that_is_not_there_is_named_before_anything_is_created(stack, aws) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-check-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"hello")
    s3.put_object(Bucket=bucket, Key="m/train_text_document.bin", Body=b"\x01")
    s3.put_object(Bucket=bucket, Key="m/train_text_document.idx", Body=INDEX)
    assert dataset_problem(run_spec("c", TRAINER, f"s3://{bucket}/corpus"), "aws_default") is None
    assert dataset_problem(run_spec("c", MEGATRON, f"s3://{bucket}/m/"), "aws_default") is None
    assert dataset_problem(run_spec("c", TRAINER), "aws_default") is None  # the sample corpus, uploaded later
    problems = {
        "no .txt": (TRAINER, f"s3://{bucket}/m/", f"dataset_uri: no .txt objects under s3://{bucket}/m/"),
        "typo": (MEGATRON, f"s3://{bucket}/mm/", f"dataset_uri: s3://{bucket}/mm/ lacks train_text_document.bin, "),
        "no bucket": (TRAINER, "s3://dtp-it-no-such-bucket/x/", "dataset_uri: cannot list s3://dtp-it-no-such-bucket/"),
    }
    for label, (recipe, uri, message) in problems.items():
        problem = dataset_problem(run_spec("c", recipe, uri), "aws_default")
        assert problem is not None and problem.startswith(message), (label, problem)


def test_objects_that_would_be_staged_as_one_file_are_refused(stack, aws, tmp_path) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-clash-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="c/a/b.txt", Body=b"one")
    s3.put_object(Bucket=bucket, Key="c/a__b.txt", Body=b"two")
    spec = run_spec("clash", TRAINER, f"s3://{bucket}/c/")
    cluster = {"shared_dir": str(tmp_path), "slurm_conn_id": "slurm_default"}
    with pytest.raises(ValueError, match=r"objects c/a/b\.txt, c/a__b\.txt under s3://.* would be staged as one file"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")


@pytest.mark.parametrize(
    ("recipe", "keys", "message"),
    [
        (MEGATRON, ["d/tok//tokenizer.json"], "object 'd/tok//tokenizer.json' is not a plain relative path under 'd/'"),
        (MEGATRON, ["d/./x"], "object 'd/./x' is not a plain relative path under 'd/'"),
        (MEGATRON, ["d/sub/../x"], "object 'd/sub/../x' is not a plain relative path under 'd/'"),
        (MEGATRON, ["d/tokenizer", "d/tokenizer/tokenizer.json"], "object 'd/tokenizer' is also a folder of other"),
        (TRAINER, ["d/a/b.txt", "d/a__b.txt"], "objects d/a/b.txt, d/a__b.txt under s3://"),
    ],
)  # fmt: skip
def test_keys_stage_data_would_refuse_are_named_before_anything_is_created(
    stack, aws, tmp_path, recipe: dict, keys: list[str], message: str
) -> None:
    s3 = aws("s3")
    bucket = f"dtp-it-keys-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for key in ["d/train_text_document.bin", "d/train_text_document.idx", "d/corpus.txt", *keys]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"\x01")
    assert set(keys) <= {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}  # stored as they are
    spec = run_spec("keys", recipe, f"s3://{bucket}/d/")
    problem = dataset_problem(spec, "aws_default")
    assert problem is not None and problem.startswith(f"dataset_uri: {message}"), problem
    # stage_data, once the cluster exists, refuses the same keys with the same words.
    cluster = cluster_with_assets(tmp_path, recipe)
    with pytest.raises(ValueError) as refused:
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert str(refused.value) == problem


def bucket_holding(aws, objects: dict[str, bytes]) -> str:
    """A new bucket holding ``objects``, by key."""
    bucket = f"dtp-it-checks-{uuid.uuid4().hex[:8]}"
    aws("s3").create_bucket(Bucket=bucket)
    for key, body in objects.items():
        aws("s3").put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


# A folder that datasets' Dataset.save_to_disk wrote, and one of data files that datasets.load_dataset reads.
SAVE_TO_DISK = {"d/data-00000-of-00001.arrow": b"\x01", "d/dataset_info.json": b"{}", "d/state.json": b"{}"}
DATA_FILES = {"d/train/part-00000.parquet": b"\x01"}


@pytest.mark.parametrize(
    ("recipe", "objects", "message"),
    [
        (NEURONX, DATA_FILES, "lacks state.json, dataset_info.json (neuronx-distributed reads a folder that datasets' "
                              "save_to_disk wrote, which its trainer's load_from_disk reads: state.json, "
                              "dataset_info.json)"),
        (TORCHTITAN, SAVE_TO_DISK, "holds state.json, so it is a folder that save_to_disk wrote (torchtitan reads "
                                   "data files with a text column, which datasets.load_dataset reads: not a "
                                   "save_to_disk folder)"),
        (PICOTRON, SAVE_TO_DISK, "holds state.json, so it is a folder that save_to_disk wrote (picotron reads data "
                                 "files with a text column"),
    ],
)  # fmt: skip
def test_a_dataset_in_a_layout_its_framework_cannot_read_is_refused_before_anything_is_created(
    stack, aws, tmp_path, recipe: dict, objects: dict[str, bytes], message: str
) -> None:
    bucket = bucket_holding(aws, objects)
    spec = run_spec("layout", recipe, f"s3://{bucket}/d")
    problem = dataset_problem(spec, "aws_default")
    assert problem is not None and problem.startswith(f"dataset_uri: s3://{bucket}/d/ {message}"), problem
    # stage_data, once the cluster exists, refuses it with the same words, before any copy.
    with pytest.raises(ValueError) as refused:
        stage_data(spec, {"DataBucket": "unused"}, cluster_with_assets(tmp_path, recipe), "aws_default")
    assert str(refused.value) == problem
    assert not (tmp_path / "datasets").exists()


@pytest.mark.parametrize(
    ("recipe", "objects"), [(NEURONX, SAVE_TO_DISK), (TORCHTITAN, DATA_FILES), (PICOTRON, DATA_FILES)]
)
def test_a_dataset_in_the_layout_its_framework_reads_is_mirrored(
    stack, aws, tmp_path, recipe: dict, objects: dict[str, bytes]
) -> None:
    bucket = bucket_holding(aws, objects)
    spec = run_spec("layout", recipe, f"s3://{bucket}/d/")
    assert dataset_problem(spec, "aws_default") is None
    staged = stage_data(spec, {"DataBucket": "unused"}, cluster_with_assets(tmp_path, recipe), "aws_default")
    assert (staged["files"], staged["copied"]) == (len(objects), len(objects))


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (megatron_index(8), "stores token ids as uint16, which cannot hold those of llama3_1_70b's 128256-token "
                            "vocabulary: tokenize the dataset with the model's tokenizer"),
        (b"MMIDIDX\x00\x00" + struct.pack("<QB", 2, 4), "is not a Megatron-LM index (version 1 of its indexed "
                                                        "dataset): it begins b'MMIDIDX"),
        (b"\x93NUMPY" + bytes(16), "is not a Megatron-LM index"),
        (b"\x02", "is 1 bytes long, shorter than a Megatron-LM index's header"),
    ],
)  # fmt: skip
def test_a_megatron_index_the_model_cannot_train_on_is_refused_before_anything_is_created(
    stack, aws, index: bytes, message: str
) -> None:
    bucket = bucket_holding(aws, {"m/train_text_document.bin": b"\x01" * 64, "m/train_text_document.idx": index})
    problem = dataset_problem(run_spec("idx", MEGATRON, f"s3://{bucket}/m/"), "aws_default")
    assert problem is not None and problem.startswith(f"dataset_uri: s3://{bucket}/m/train_text_document.idx {message}")


def test_model_assets_missing_or_of_another_model_are_refused_before_any_copy(stack, aws, tmp_path) -> None:
    spec, cluster, dest = megatron_dataset(aws, tmp_path, INDEXED)
    assets = tmp_path / "assets" / "llama3_1_70b"
    (assets / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"assets/llama3_1_70b lacks tokenizer\.json: megatron-lm loads llama3_1_70b"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    (assets / "tokenizer.json").write_text("{}")
    config = json.loads((assets / "config.json").read_text())
    (assets / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 32}))  # Llama 3.1 8B's
    with pytest.raises(ValueError, match=r"num_hidden_layers is 32, and the recipe's model llama3_1_70b has 80"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not dest.exists() and not (tmp_path / "runs").exists()


def test_a_copy_the_shared_filesystem_has_no_room_for_is_refused_before_it_starts(
    stack, aws, tmp_path, monkeypatch
) -> None:
    bucket = bucket_holding(aws, {"corpus/a.txt": b"hello ", "corpus/b.txt": b"world"})
    spec = run_spec("room", TRAINER, f"s3://{bucket}/corpus/")
    cluster = cluster_with_assets(tmp_path, TRAINER)
    free = {"bytes": 21}
    monkeypatch.setattr(
        "dtp.pipeline.s3_objects.shutil.disk_usage", lambda path: SimpleNamespace(total=1 << 40, free=free["bytes"])
    )
    # The .txt copies (11 bytes) and the shard written from them (11 more).
    with pytest.raises(NoRoomToCopy, match=r"/runs/room/data: staging needs 22 bytes \(0\.0 GiB\) there, and its "):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not (tmp_path / "runs/room/data").exists()
    free["bytes"] = 22
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 2
    # Staged again: the copies are there, the shard is written anew.
    free["bytes"] = 11
    assert stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")["copied"] == 0
    # A framework's mirror needs room for the objects it still has to copy.
    spec, cluster, dest = megatron_dataset(aws, tmp_path, INDEXED)
    with pytest.raises(NoRoomToCopy, match=rf"{dest}: staging needs {4096 + len(INDEX)} bytes"):
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert not dest.exists()


def test_a_corpus_shorter_than_one_sequence_is_refused_before_any_copy(stack, aws, tmp_path) -> None:
    bucket = bucket_holding(aws, {"corpus/a.txt": b"abcd"})  # 4 tokens; a sequence of 4 reads 5
    spec = run_spec("short", TRAINER, f"s3://{bucket}/corpus/")
    with pytest.raises(
        ValueError, match=r"hold 4 tokens \(bytes\), fewer than one sequence of the recipe's seq_len 4 \+ 1"
    ):
        stage_data(spec, {"DataBucket": "unused"}, cluster_with_assets(tmp_path, TRAINER), "aws_default")
    assert not (tmp_path / "runs/short/data").exists()
