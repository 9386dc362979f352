"""The checks of the training data path that need no S3: a dataset's layout and Megatron-LM index, the model's
Hugging Face files, room on the shared filesystem, the mirror a dataset_uri names, and the shard's tokenization."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.pipeline.data import check_model_assets, megatron_index_problem, tokenize
from dtp.pipeline.frameworks import (
    ASSET_FILES,
    MEGATRON_ARCHITECTURES,
    VOCABULARY_SIZES,
    dataset_dir,
    dataset_files_problem,
    hf_config_shape,
)
from dtp.pipeline.s3_objects import NoRoomToCopy, bytes_to_copy, check_room, download
from model import MODELS


class OneObject:
    """A stand-in for an ``S3Hook`` whose bucket holds one object, ``body``, and answers ranged GETs as S3 does."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.ranges: list[str] = []

    def get_conn(self) -> OneObject:
        return self

    def get_object(self, Bucket: str, Key: str, Range: str) -> dict[str, Any]:
        self.ranges.append(Range)
        first, last = (int(end) for end in Range.removeprefix("bytes=").split("-"))
        return {"Body": io.BytesIO(self.body[first : last + 1])}


def index_problem(body: bytes, model: str = "llama3_1_8b") -> str | None:
    return megatron_index_problem(cast(S3Hook, OneObject(body)), "b", "m/train_text_document.idx", model)


def megatron_index(version: int, type_code: int) -> bytes:
    """The start of a Megatron-LM index: magic, version, token type code, then its counts."""
    return b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", version, type_code, 3, 3)


def test_only_the_header_of_a_megatron_index_is_read() -> None:
    hook = OneObject(megatron_index(1, 4) + bytes(1 << 20))
    assert megatron_index_problem(cast(S3Hook, hook), "b", "m/train_text_document.idx", "llama3_1_8b") is None
    assert hook.ranges == ["bytes=0-17"]


@pytest.mark.parametrize("type_code", [4, 5])  # int32, int64
def test_a_megatron_index_of_ids_that_reach_the_vocabulary_is_accepted(type_code: int) -> None:
    assert index_problem(megatron_index(1, type_code)) is None


def test_a_megatron_index_tokenized_for_a_smaller_vocabulary_is_refused() -> None:
    # Megatron-LM's preprocess_data.py stores GPT-2's tokens (50257) as uint16: Llama 3's 128256 do not fit.
    assert index_problem(megatron_index(1, 8)) == (
        "dataset_uri: s3://b/m/train_text_document.idx stores token ids as uint16, which cannot hold those of "
        "llama3_1_8b's 128256-token vocabulary: tokenize the dataset with the model's tokenizer (Megatron-LM's "
        "preprocess_data.py then stores them as int32)"
    )
    assert index_problem(megatron_index(1, 8), model="a_model_dtp_has_no_vocabulary_for") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (megatron_index(2, 4), "is not a Megatron-LM index (version 1 of its indexed dataset): it begins"),
        (b"MMIDIDX\x00\x01" + struct.pack("<QB", 1, 4), "is not a Megatron-LM index"),
        (megatron_index(1, 7), "stores token ids as type code 7, not an integer type"),  # float32
        (b"MMIDIDX", "is 7 bytes long, shorter than a Megatron-LM index's header"),
    ],
)
def test_what_is_not_a_megatron_index_is_refused(body: bytes, message: str) -> None:
    problem = index_problem(body)
    assert problem is not None and problem.startswith(f"dataset_uri: s3://b/m/train_text_document.idx {message}")


@pytest.mark.parametrize(
    ("framework", "files", "problem"),
    [
        ("neuronx-distributed", {"state.json", "dataset_info.json"}, None),
        ("neuronx-distributed", {"dataset_info.json"}, "lacks state.json (neuronx-distributed reads a folder that "),
        ("torchtitan", {"train.parquet"}, None),
        ("torchtitan", {"state.json"}, "holds state.json, so it is a folder that save_to_disk wrote (torchtitan "),
        ("picotron", {"state.json", "dataset_info.json"}, "holds state.json, so it is a folder that save_to_disk "),
        ("megatron-lm", {"state.json", "train_text_document.bin", "train_text_document.idx"}, None),
        ("megatron-lm", {"train_text_document.bin"}, "lacks train_text_document.idx (megatron-lm reads an indexed "),
    ],
)
def test_a_dataset_folder_is_judged_by_the_layout_its_framework_reads(
    framework: str, files: set[str], problem: str | None
) -> None:
    found = dataset_files_problem(framework, files.__contains__)
    assert found == problem if problem is None else found is not None and found.startswith(problem)


def test_the_model_shapes_are_the_trainers() -> None:
    assert set(VOCABULARY_SIZES) == set(MEGATRON_ARCHITECTURES)
    for name in MEGATRON_ARCHITECTURES:
        model = MODELS[name]
        assert hf_config_shape(name) == {
            "vocab_size": model.vocab_size,
            "hidden_size": model.dim,
            "num_hidden_layers": model.n_layers,
            "num_attention_heads": model.n_heads,
            "num_key_value_heads": model.n_kv_heads,
            "intermediate_size": model.ffn_dim,
        }, name
    assert hf_config_shape("tiny") == {}


def place_assets(shared: Path, framework: str, model: str, **config: Any) -> Path:
    """``framework``'s Hugging Face files of ``model`` under ``shared``, the config's fields overridden by
    ``config``; their folder."""
    assets = shared / "assets" / model
    assets.mkdir(parents=True)
    for name in ASSET_FILES[framework]:
        (assets / name).write_text("{}")
    (assets / "config.json").write_text(json.dumps({"model_type": "llama", **hf_config_shape(model), **config}))
    return assets


def assets_spec(framework: str, model: str) -> dict[str, Any]:
    return {"recipe": {"framework": framework, "model": model}}


@pytest.mark.parametrize(("framework", "model"), [("picotron", "llama3_2_1b"), ("neuronx-distributed", "llama3_1_8b")])
def test_the_models_files_are_accepted(tmp_path: Path, framework: str, model: str) -> None:
    place_assets(tmp_path, framework, model)
    check_model_assets(assets_spec(framework, model), {"shared_dir": str(tmp_path)})


def test_a_model_dtp_has_no_shape_for_needs_its_files_alone(tmp_path: Path) -> None:
    place_assets(tmp_path, "picotron", "tiny", hidden_size=7)
    check_model_assets(assets_spec("picotron", "tiny"), {"shared_dir": str(tmp_path)})


def test_missing_model_files_are_named(tmp_path: Path) -> None:
    assets = place_assets(tmp_path, "picotron", "llama3_2_1b")
    (assets / "tokenizer.json").unlink()
    (assets / "config.json").unlink()
    with pytest.raises(ValueError) as refused:
        check_model_assets(assets_spec("picotron", "llama3_2_1b"), {"shared_dir": str(tmp_path)})
    assert str(refused.value) == (
        f"{assets} lacks config.json, tokenizer.json: picotron loads llama3_2_1b's Hugging Face files from there, "
        "which must be placed there beforehand (see the README's Recipes and frameworks)"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("vocab_size", 32000, 128256),  # Llama 2's tokenizer
        ("hidden_size", 4096, 2048),
        ("num_hidden_layers", 32, 16),
        ("num_attention_heads", 16, 32),
        ("num_key_value_heads", None, 8),
        ("intermediate_size", 11008, 8192),
    ],
)
def test_a_config_of_another_model_is_refused_naming_the_field(
    tmp_path: Path, field: str, value: int | None, expected: int
) -> None:
    assets = place_assets(tmp_path, "picotron", "llama3_2_1b", **{field: value})
    with pytest.raises(ValueError) as refused:
        check_model_assets(assets_spec("picotron", "llama3_2_1b"), {"shared_dir": str(tmp_path)})
    assert str(refused.value) == (
        f"{assets}/config.json: {field} is {value!r}, and the recipe's model llama3_2_1b has {expected}: place "
        f"llama3_2_1b's Hugging Face files in {assets}"
    )


def test_a_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    assets = place_assets(tmp_path, "neuronx-distributed", "llama3_1_8b")
    (assets / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: not a JSON file"):
        check_model_assets(assets_spec("neuronx-distributed", "llama3_1_8b"), {"shared_dir": str(tmp_path)})


def test_only_the_bytes_still_to_copy_count(tmp_path: Path) -> None:
    modified = datetime(2026, 1, 2, tzinfo=UTC)
    copied, other = tmp_path / "copied.bin", tmp_path / "other.bin"

    class Downloads:
        def get_conn(self) -> Downloads:
            return self

        def download_file(self, bucket: str, key: str, path: str) -> None:
            Path(path).write_bytes(b"x" * 5)

    download(cast(S3Hook, Downloads()), "b", "k", 5, copied, modified)
    other.write_bytes(b"y" * 7)  # of the object's size, but not its copy
    listed = {"Size": 5, "LastModified": modified}
    copies = [(listed, copied), ({"Size": 7, "LastModified": modified}, other), (listed, tmp_path / "absent.bin")]
    assert bytes_to_copy(copies) == 7 + 5


def test_a_copy_needs_its_bytes_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def disk_usage(path: Path) -> SimpleNamespace:
        seen.append(path)
        return SimpleNamespace(total=1 << 40, used=0, free=3 << 30)

    monkeypatch.setattr("dtp.pipeline.s3_objects.shutil.disk_usage", disk_usage)
    dest = tmp_path / "datasets" / "megatron-lm" / "0123"  # not made yet: its file system is its parents'
    check_room(dest, 3 << 30)
    with pytest.raises(NoRoomToCopy) as refused:
        check_room(dest, (3 << 30) + 1)
    assert str(refused.value) == (
        f"{dest}: staging needs 3221225473 bytes (3.0 GiB) there, and its file system has 3221225472 bytes "
        "(3.0 GiB) free: free some space or give the shared file system more"
    )
    assert seen == [tmp_path, tmp_path]


def test_a_dataset_uri_with_or_without_its_slash_is_one_mirror() -> None:
    assert dataset_dir("/fsx", "picotron", "s3://b/ds") == dataset_dir("/fsx", "picotron", "s3://b/ds/")
    assert dataset_dir("/fsx", "picotron", "s3://b/ds") != dataset_dir("/fsx", "picotron", "s3://b/ds2/")


def test_the_shard_is_the_files_bytes_in_order_read_a_buffer_at_a_time(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(bytes(range(256)) * (64 << 12))  # 64 MiB
    small = tmp_path / "small.txt"
    small.write_bytes("héllo\n".encode())
    shard = tmp_path / "train.bin"
    tracemalloc.start()
    try:
        tokens = tokenize([small, big, small], shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tokens == 2 * small.stat().st_size + big.stat().st_size == shard.stat().st_size
    assert shard.read_bytes() == small.read_bytes() + big.read_bytes() + small.read_bytes()
    assert peak < 8 << 20  # the file is 64 MiB
    assert not shard.with_suffix(".tmp").exists()
