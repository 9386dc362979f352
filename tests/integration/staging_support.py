"""What the stage_data tests share: the recipes of a few frameworks, a run's spec, a Megatron-LM index, a cluster
holding a model's files, a bucket holding objects, and a Megatron-LM dataset in a bucket."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path
from typing import Any

from dtp.pipeline.frameworks import ASSET_FILES, dataset_dir, hf_config_shape

TRAINER: dict[str, Any] = {"framework": "fsdp", "model": "tiny", "seq_len": 4}
MEGATRON = {"framework": "megatron-lm", "model": "llama3_1_70b"}
TORCHTITAN = {"framework": "torchtitan", "model": "llama3_1_8b"}
EXPIRES_AT = "2026-12-06T10:00:00Z"


def run_spec(run_key: str, recipe: dict, dataset_uri: str = "") -> dict:
    """The spec stage_data reads of run ``run_key``, training ``recipe`` on ``dataset_uri``."""
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


def bucket_holding(aws, objects: dict[str, bytes]) -> str:
    """A new bucket holding ``objects``, by key."""
    bucket = f"dtp-it-staging-{uuid.uuid4().hex[:8]}"
    aws("s3").create_bucket(Bucket=bucket)
    for key, body in objects.items():
        aws("s3").put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def megatron_dataset(aws, tmp_path: Path, objects: dict[str, bytes]) -> tuple[dict, dict, Path]:
    """A bucket holding ``objects`` under ``m/``, a Megatron-LM run reading it, its cluster, and the mirror's path."""
    bucket = bucket_holding(aws, {f"m/{key}": body for key, body in objects.items()})
    spec = run_spec("fw", MEGATRON, f"s3://{bucket}/m/")
    cluster = cluster_with_assets(tmp_path, MEGATRON)
    return spec, cluster, Path(dataset_dir(str(tmp_path), "megatron-lm", f"s3://{bucket}/m/"))


INDEXED = {"train_text_document.bin": b"\x01" * 4096, "train_text_document.idx": INDEX}
