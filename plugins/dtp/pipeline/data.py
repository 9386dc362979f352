"""Stage the dataset: S3 -> the cluster's shared filesystem (-> a byte-level token shard for DTP's trainer).

DTP's trainer gets the ``.txt`` objects under ``dataset_uri`` tokenized into one
shard in the run's directory. Another framework's recipe gets the objects under
``dataset_uri`` mirrored, as they are, into the directory its job reads
(``<shared>/datasets/<framework>/<hash of dataset_uri>/``), checked for the files that
framework needs; NeMo's recipes train on synthetic tokens and stage nothing.

The worker copies into the cluster's shared filesystem, so the task runs on the
``training`` queue, whose worker sits where that filesystem is mounted (the
head node or controller on AWS, this host on the local profile); it checks it
sees the filesystem before writing anything. Staging is idempotent: an object
whose copy is already there (the file DTP wrote from it, which has its size and
its LastModified as modification time, both as the listing of ``dataset_uri``
gives them) is not copied again, every file and the shard are written to a
temporary name and renamed, so a half-written file is never used, and a mirror
loses the files of objects no longer under ``dataset_uri``. Before it copies
anything it checks that the shared filesystem has room for what it still has to
copy and, for a framework that reads the model's Hugging Face files, that they
are there and of the recipe's model.

The mirror is ``dtp.pipeline.mirror``'s, the copy of an object
``dtp.pipeline.s3_objects``'s, and the run's directory and its lease on a
mirror ``dtp.pipeline.run_dirs``'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.pipeline.frameworks import (
    ASSET_FILES,
    DATASET_FILES,
    LOADS_DATA_FILES,
    VOCABULARY_SIZES,
    dataset_dir,
    dataset_files_problem,
    datasets_cache_dir,
    hf_config_shape,
)
from dtp.pipeline.mirror import mirror_dataset, mirror_paths
from dtp.pipeline.run_dirs import claim_run_dir, lease_shared_dir, run_dir
from dtp.pipeline.s3_objects import bytes_to_copy, check_room, download_all, s3_folder
from dtp.recipes import INCLUDE_DIR

log = logging.getLogger(__name__)
SAMPLE_CORPUS = INCLUDE_DIR / "data" / "corpus.txt"
# Pages of a listing (1,000 keys each) whose keys dataset_problem checks before anything is created: enough for any
# dataset of shards while keeping validate_params to seconds. A bad key past them is still refused, by stage_data
# (which lists every key, as it copies every object), only later.
CHECKED_PAGES = 20
# Megatron-LM's indexed dataset (megatron/core/datasets/indexed_dataset.py, core_v0.12.1): the index its job reads
# (``train_text_document.idx``) starts with this magic, a <Q version (1) and a <B code of the type the ``.bin`` stores
# token ids as, which its preprocess_data.py picks by the tokenizer's vocabulary (uint16 below 65500 tokens).
MEGATRON_INDEX = "train_text_document.idx"
MEGATRON_INDEX_HEADER = struct.Struct("<9sQB")
MEGATRON_INDEX_MAGIC = b"MMIDIDX\x00\x00"
# The integer types of those codes, and the largest token id each holds.
MEGATRON_TOKEN_TYPES = {
    1: ("uint8", 2**8 - 1),
    2: ("int8", 2**7 - 1),
    3: ("int16", 2**15 - 1),
    4: ("int32", 2**31 - 1),
    5: ("int64", 2**63 - 1),
    8: ("uint16", 2**16 - 1),
}
# Bytes ``tokenize`` holds in memory at once, however large a file.
TOKENIZE_BUFFER = 1 << 20


def upload_sample_corpus(s3: S3Hook, bucket: str) -> str:
    """Upload the sample corpus shipped with DTP to ``bucket`` unless an object of its size is there; its folder's
    URI."""
    key = "datasets/sample/corpus.txt"
    if (
        not s3.check_for_key(key, bucket)
        or s3.head_object(key, bucket)["ContentLength"] != SAMPLE_CORPUS.stat().st_size
    ):
        s3.load_file(str(SAMPLE_CORPUS), key, bucket, replace=True)
    return f"s3://{bucket}/datasets/sample/"


class SharedFilesystemNotVisible(RuntimeError):
    """This worker does not see the cluster's shared filesystem, so it cannot stage data into it."""


def check_shared_dir_visible(cluster: dict[str, Any]) -> None:
    """Fail unless this worker sees the cluster's shared filesystem (a file written there through the cluster's
    connection must show up here), so staging never fills a local directory the nodes cannot read."""
    hook = SharedFilesystemHook.of_cluster(cluster)
    shared = cluster["shared_dir"]
    if hook.transport == "local":
        visible = Path(shared).is_dir()
    else:
        probe = f"{shared}/.dtp-probe-{uuid.uuid4().hex}"
        hook.write_file(probe, "")
        visible = Path(probe).exists()
        hook.run(["rm", "-f", probe], check=False)
    if not visible:
        raise SharedFilesystemNotVisible(
            f"stage_data writes the dataset into {shared}, which this worker does not see: run the worker of the "
            "'training' queue where the cluster's shared filesystem is mounted (the head node or controller)"
        )


def dataset_problem(spec: dict[str, Any], aws_conn_id: str) -> str | None:
    """Why ``dataset_uri`` cannot be staged (nothing there to train on, a dataset not in the framework's format, keys
    ``stage_data`` would refuse, or S3 refusing to list it), asked before anything is created; ``stage_data`` checks
    again as it copies. Checks the keys of the listing's first ``CHECKED_PAGES`` pages, however large the dataset
    (for DTP's trainer it lists on from there only until it meets a ``.txt``), and a Megatron-LM index's header."""
    source, framework = spec["params"]["dataset_uri"], spec["recipe"]["framework"]
    if framework == "nemo" and source:  # a dataset it would never read: said, not silently ignored
        return (
            f"dataset_uri: got {source!r}; NeMo's recipes train on synthetic tokens and read no dataset: leave it empty"
        )
    if not source or framework == "nemo":  # the shipped sample corpus; NeMo trains on synthetic tokens
        return None
    try:
        bucket, prefix = s3_folder(source, "dataset_uri")
    except ValueError as err:
        return str(err)
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    try:
        if framework in DATASET_FILES:
            problem = dataset_files_problem(framework, lambda name: s3.check_for_key(prefix + name, bucket))
            checked = islice(_listed(s3, bucket, prefix), CHECKED_PAGES)
            keys = [key for page in checked for key in page if not key.endswith("/")]  # less folder markers
            if problem or not keys:
                return f"dataset_uri: s3://{bucket}/{prefix} {problem or 'holds no objects'}"
            mirror_paths(keys, prefix)
            if framework == "megatron-lm":
                return megatron_index_problem(s3, bucket, prefix + MEGATRON_INDEX, spec["recipe"]["model"])
            return None
        pages = _listed(s3, bucket, prefix)
        keys = [key for page in islice(pages, CHECKED_PAGES) for key in page]
        # The rest of the pages only while no .txt has shown up: one is enough to train on.
        if not any(key.endswith(".txt") for key in keys) and not any(k.endswith(".txt") for p in pages for k in p):
            return f"dataset_uri: no .txt objects under {source}"
        shard_files(keys, prefix, source)
    except ClientError as err:
        return f"dataset_uri: cannot list {source}: {err.response['Error']['Code']}"
    except ValueError as err:  # a key stage_data would refuse
        return str(err)
    return None


def megatron_index_problem(s3: S3Hook, bucket: str, key: str, model: str) -> str | None:
    """Why the object ``key`` cannot be the index of ``model``'s Megatron-LM dataset, read from its header alone: not
    an index of Megatron-LM's indexed dataset, or one of token ids stored in a type that cannot hold every id of the
    model's vocabulary (a dataset tokenized for a smaller one, such as GPT-2's, would train on other tokens)."""
    uri = f"s3://{bucket}/{key}"
    try:
        header = s3.get_conn().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MEGATRON_INDEX_HEADER.size - 1}")
    except ClientError as err:
        return f"dataset_uri: cannot read {uri}: {err.response['Error']['Code']}"
    data = header["Body"].read()
    if len(data) < MEGATRON_INDEX_HEADER.size:
        return f"dataset_uri: {uri} is {len(data)} bytes long, shorter than a Megatron-LM index's header"
    magic, version, code = MEGATRON_INDEX_HEADER.unpack(data)
    if magic != MEGATRON_INDEX_MAGIC or version != 1:
        return f"dataset_uri: {uri} is not a Megatron-LM index (version 1 of its indexed dataset): it begins {data!r}"
    if code not in MEGATRON_TOKEN_TYPES:
        return f"dataset_uri: {uri} stores token ids as type code {code}, not an integer type"
    token_type, largest = MEGATRON_TOKEN_TYPES[code]
    vocabulary = VOCABULARY_SIZES.get(model)
    if vocabulary is not None and largest < vocabulary - 1:
        return (
            f"dataset_uri: {uri} stores token ids as {token_type}, which cannot hold those of {model}'s "
            f"{vocabulary}-token vocabulary: tokenize the dataset with the model's tokenizer (Megatron-LM's "
            "preprocess_data.py then stores them as int32)"
        )
    return None


def _listed(s3: S3Hook, bucket: str, prefix: str) -> Iterator[list[str]]:
    """The keys under ``prefix``, a page at a time, listed as each is asked for."""
    pages = s3.get_conn().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return ([obj["Key"] for obj in page.get("Contents", [])] for page in pages)


def shard_files(keys: list[str], prefix: str, source: str) -> dict[str, str]:
    """The ``.txt`` objects among ``keys`` (under ``prefix`` of ``source``), sorted, by the file name each is staged
    as in the run's flat data folder (``a/b.txt`` -> ``a__b.txt``). Objects that would be staged as one file
    (``a/b.txt`` and ``a__b.txt``: one of them would be read twice into the shard) raise ValueError."""
    names = {key: key[len(prefix) :].lstrip("/").replace("/", "__") for key in sorted(keys) if key.endswith(".txt")}
    counts = Counter(names.values())
    if len(counts) < len(names):
        same = sorted(key for key, name in names.items() if counts[name] > 1)
        raise ValueError(f"dataset_uri: objects {', '.join(same)} under {source} would be staged as one file")
    return names


def check_model_assets(spec: dict[str, Any], cluster: dict[str, Any]) -> None:
    """Fail unless ``<shared>/assets/<model>/`` holds the model's Hugging Face files that the recipe's framework
    loads (``ASSET_FILES``) and its ``config.json`` gives the shape of the recipe's model (``hf_config_shape``): a
    framework that takes the shape from the config would train another model, one that reads the tokenizer alone
    would train on another model's tokens."""
    framework, model = spec["recipe"]["framework"], spec["recipe"]["model"]
    assets = Path(cluster["shared_dir"]) / "assets" / model
    if missing := [name for name in ASSET_FILES[framework] if not (assets / name).is_file()]:
        raise ValueError(
            f"{assets} lacks {', '.join(missing)}: {framework} loads {model}'s Hugging Face files from there, which "
            "must be placed there beforehand (see the README's Recipes and frameworks)"
        )
    config_path = assets / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not a JSON file ({err})") from None
    for field, value in hf_config_shape(model).items():
        if config.get(field) != value:
            raise ValueError(
                f"{config_path}: {field} is {config.get(field)!r}, and the recipe's model {model} has {value}: "
                f"place {model}'s Hugging Face files in {assets}"
            )


def stage_data(
    spec: dict[str, Any], network: dict[str, str], cluster: dict[str, Any], aws_conn_id: str
) -> dict[str, Any]:
    """Stage ``dataset_uri`` (empty: the sample corpus, uploaded to the run's data bucket) on the cluster's shared
    filesystem: tokenized into the run's ``train.bin`` for DTP's trainer, mirrored as it is for another framework;
    what was staged, copied and moved (and, from a mirror, removed)."""
    framework = spec["recipe"]["framework"]
    if framework == "nemo":  # its run directory is first written by prepare_preflight, which claims it then
        log.info("NeMo's recipes train on synthetic tokens: nothing to stage")
        return {"source": None, "files": 0, "copied": 0, "bytes_moved": 0}
    check_shared_dir_visible(cluster)
    if framework in ASSET_FILES:
        check_model_assets(spec, cluster)
    claim_run_dir(spec, cluster)
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    source = spec["params"]["dataset_uri"] or upload_sample_corpus(s3, network["DataBucket"])
    bucket, prefix = s3_folder(source, "dataset_uri")
    if framework in DATASET_FILES:
        dest = Path(dataset_dir(cluster["shared_dir"], framework, source))
        lease_shared_dir(spec, cluster, dest)  # before the mirror is looked at: every run of the dataset shares it
        if framework in LOADS_DATA_FILES:  # its jobs' datasets cache, beside the mirror
            lease_shared_dir(spec, cluster, Path(datasets_cache_dir(str(dest))))
        return mirror_dataset(s3, bucket, prefix, dest, framework) | {"source": source}
    listed = {obj["Key"]: obj for obj in s3.iter_file_metadata(prefix, bucket)}
    names = shard_files(list(listed), prefix, source)
    if not names:
        raise ValueError(f"dataset_uri: no .txt objects under {source}")
    corpus_tokens = sum(listed[key]["Size"] for key in names)  # a token per byte
    seq_len = spec["recipe"]["seq_len"]
    if corpus_tokens < seq_len + 1:  # the trainer's windows are seq_len + 1 tokens long
        raise ValueError(
            f"dataset_uri: the .txt objects under {source} hold {corpus_tokens} tokens (bytes), fewer than one "
            f"sequence of the recipe's seq_len {seq_len} + 1"
        )
    dest = run_dir(spec, cluster) / "data"
    targets = {key: dest / name for key, name in names.items()}
    # The copies still to make, and the shard, written whole beside the one it replaces.
    check_room(dest, bytes_to_copy((listed[key], target) for key, target in targets.items()) + corpus_tokens)
    dest.mkdir(parents=True, exist_ok=True)
    copies = ((key, listed[key]["Size"], listed[key]["LastModified"], target) for key, target in targets.items())
    copied, moved_bytes = download_all(s3, bucket, copies)
    files = list(targets.values())
    shard = dest.parent / "train.bin"
    tokens = tokenize(files, shard)
    log.info(
        "Staged %s: %d files (%d copied, %d bytes moved), %d tokens -> %s",
        source,
        len(files),
        copied,
        moved_bytes,
        tokens,
        shard,
    )
    return {
        "source": source,
        "files": len(files),
        "copied": copied,
        "bytes_moved": moved_bytes,
        "tokens": tokens,
        "train_bin": str(shard),
    }


def tokenize(files: list[Path], shard: Path) -> int:
    """Byte-level tokenization (vocabulary 256): the shard is the files' UTF-8 bytes, in order, copied
    ``TOKENIZE_BUFFER`` bytes at a time; its tokens."""
    tmp = shard.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for path in files:
            with path.open("rb") as source:
                shutil.copyfileobj(source, out, TOKENIZE_BUFFER)
        total = out.tell()
    os.replace(tmp, shard)
    return total
