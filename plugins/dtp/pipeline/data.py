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
loses the files of objects no longer under ``dataset_uri``.

The mirror is ``dtp.pipeline.mirror``'s, the copy of an object
``dtp.pipeline.s3_objects``'s, and the run's directory and its lease on a
mirror ``dtp.pipeline.run_dirs``'s.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.pipeline.frameworks import DATASET_FILES, dataset_dir
from dtp.pipeline.mirror import mirror_dataset, mirror_paths
from dtp.pipeline.run_dirs import claim_run_dir, lease_shared_dir, run_dir
from dtp.pipeline.s3_objects import download, s3_folder
from dtp.recipes import INCLUDE_DIR

log = logging.getLogger(__name__)
SAMPLE_CORPUS = INCLUDE_DIR / "data" / "corpus.txt"
# Pages of a listing (1,000 keys each) whose keys dataset_problem checks before anything is created: enough for any
# dataset of shards while keeping validate_params to seconds. A bad key past them is still refused, by stage_data
# (which lists every key, as it copies every object), only later.
CHECKED_PAGES = 20


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
    """Why ``dataset_uri`` cannot be staged (nothing there to train on, the framework's files missing, keys
    ``stage_data`` would refuse, or S3 refusing to list it), asked before anything is created; ``stage_data`` checks
    again as it copies. Checks the keys of the listing's first ``CHECKED_PAGES`` pages, however large the dataset
    (for DTP's trainer it lists on from there only until it meets a ``.txt``)."""
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
            missing = [name for name in DATASET_FILES[framework] if not s3.check_for_key(prefix + name, bucket)]
            checked = islice(_listed(s3, bucket, prefix), CHECKED_PAGES)
            keys = [key for page in checked for key in page if not key.endswith("/")]  # less folder markers
            if missing or not keys:
                why = f"lacks {', '.join(missing)} (this framework reads them)" if missing else "holds no objects"
                return f"dataset_uri: s3://{bucket}/{prefix} {why}"
            mirror_paths(keys, prefix)
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
    claim_run_dir(spec, cluster)
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    source = spec["params"]["dataset_uri"] or upload_sample_corpus(s3, network["DataBucket"])
    bucket, prefix = s3_folder(source, "dataset_uri")
    if framework in DATASET_FILES:
        dest = Path(dataset_dir(cluster["shared_dir"], framework, source))
        lease_shared_dir(spec, cluster, dest)  # before the mirror is looked at: every run of the dataset shares it
        return mirror_dataset(s3, bucket, prefix, dest, DATASET_FILES[framework]) | {"source": source}
    listed = {obj["Key"]: obj for obj in s3.iter_file_metadata(prefix, bucket)}
    names = shard_files(list(listed), prefix, source)
    if not names:
        raise ValueError(f"dataset_uri: no .txt objects under {source}")
    dest = run_dir(spec, cluster) / "data"
    dest.mkdir(parents=True, exist_ok=True)
    targets = {key: dest / name for key, name in names.items()}
    copied = moved_bytes = 0
    files = []
    for key, target in targets.items():
        size = listed[key]["Size"]
        if download(s3, bucket, key, size, target, listed[key]["LastModified"]):
            copied += 1
            moved_bytes += size
        files.append(target)
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
    """Byte-level tokenization (vocabulary 256): the shard is the files' UTF-8 bytes, in order."""
    tmp = shard.with_suffix(".tmp")
    total = 0
    with tmp.open("wb") as out:
        for path in files:
            data = path.read_bytes()
            out.write(data)
            total += len(data)
    os.replace(tmp, shard)
    return total
