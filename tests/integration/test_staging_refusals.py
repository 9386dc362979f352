"""stage_data and dataset_problem refuse a dataset its framework cannot train on, keys that would not stage as they
are, a copy the shared filesystem has no room for, and a corpus shorter than a sequence: before anything is created
(dataset_problem) or before any copy (stage_data)."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
from staging_support import (
    INDEX,
    INDEXED,
    MEGATRON,
    TORCHTITAN,
    TRAINER,
    bucket_holding,
    cluster_with_assets,
    megatron_dataset,
    megatron_index,
    run_spec,
)

from dtp.pipeline.data import dataset_problem, stage_data
from dtp.pipeline.s3_objects import NoRoomToCopy

pytestmark = pytest.mark.stack
NEURONX = {"framework": "neuronx-distributed", "model": "llama3_1_8b"}
PICOTRON = {"framework": "picotron", "model": "llama3_2_1b"}


def test_a_framework_dataset_without_its_index_is_refused_before_any_copy(stack, aws, tmp_path) -> None:
    bucket = bucket_holding(aws, {"m/train_text_document.bin": b"\x01"})
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
    objects = {"corpus/a.txt": b"hello", "m/train_text_document.bin": b"\x01", "m/train_text_document.idx": INDEX}
    bucket = bucket_holding(aws, objects)
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
    bucket = bucket_holding(aws, {"c/a/b.txt": b"one", "c/a__b.txt": b"two"})
    spec = run_spec("clash", TRAINER, f"s3://{bucket}/c/")
    with pytest.raises(ValueError, match=r"objects c/a/b\.txt, c/a__b\.txt under s3://.* would be staged as one file"):
        stage_data(spec, {"DataBucket": "unused"}, cluster_with_assets(tmp_path, TRAINER), "aws_default")


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
    stored = ["d/train_text_document.bin", "d/train_text_document.idx", "d/corpus.txt", *keys]
    bucket = bucket_holding(aws, dict.fromkeys(stored, b"\x01"))
    listed = aws("s3").list_objects_v2(Bucket=bucket)["Contents"]
    assert set(keys) <= {o["Key"] for o in listed}  # stored as they are
    spec = run_spec("keys", recipe, f"s3://{bucket}/d/")
    problem = dataset_problem(spec, "aws_default")
    assert problem is not None and problem.startswith(f"dataset_uri: {message}"), problem
    # stage_data, once the cluster exists, refuses the same keys with the same words.
    cluster = cluster_with_assets(tmp_path, recipe)
    with pytest.raises(ValueError) as refused:
        stage_data(spec, {"DataBucket": "unused"}, cluster, "aws_default")
    assert str(refused.value) == problem


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
