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
its LastModified as modification time) is not copied again, every file and the
shard are written to a temporary name and renamed, so a half-written file is
never used, and a mirror loses the files of objects no longer under
``dataset_uri``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import stat
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.naming import EXPIRES_TAG
from dtp.pipeline.frameworks import DATASET_FILES, dataset_dir
from dtp.recipes import INCLUDE_DIR

log = logging.getLogger(__name__)
SAMPLE_CORPUS = INCLUDE_DIR / "data" / "corpus.txt"
RUN_MARKER = "run.json"
# Run directories sit under this folder of the shared filesystem, and what runs save under the same prefix of the
# artifacts bucket.
RUNS_FOLDER = "runs"
# The leases on the directories runs share (``lease_shared_dir``) sit under this folder, each directory's at the path it
# has under the shared filesystem: ``leases/datasets/<framework>/<hash>/<run_key>.json``.
LEASES_FOLDER = "leases"
S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)$")
# Pages of a listing (1,000 keys each) whose keys dataset_problem checks before anything is created: enough for any
# dataset of shards while keeping validate_params to seconds. A bad key past them is still refused, by stage_data
# (which lists every key, as it copies every object), only later.
CHECKED_PAGES = 20
# A temporary file of ``download`` (``.NAME.1a2b3c4d.tmp``), or boto3's while it writes one (8 hex digits more).
DOWNLOAD_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[0-9a-fA-F]{8})?$")
# How long a temporary file of a download goes unwritten before a mirror takes it for one whose run is gone.
STALE_DOWNLOAD = timedelta(hours=1)


def run_dir(spec: dict[str, Any], cluster: dict[str, Any]) -> Path:
    return Path(cluster["shared_dir"]) / RUNS_FOLDER / spec["names"]["run_key"]


def run_marker(spec: dict[str, Any]) -> str:
    """The marker of what a run leaves on the shared filesystem (its directory's ``RUN_MARKER``, its leases), which
    the reaper reads: the run, the DAG run that made it and when it expires."""
    return json.dumps(
        {
            "run_key": spec["names"]["run_key"],
            "dag_id": spec["dag_id"],
            "run_id": spec["run_id"],
            "expires_at": spec["tags"][EXPIRES_TAG],
        }
    )


def claim_run_dir(spec: dict[str, Any], cluster: dict[str, Any]) -> Path:
    """The run's directory, marked with ``RUN_MARKER``: the run it belongs to and when it expires. A shared
    filesystem may outlive the cluster (an existing FSx); the reaper removes the directory once it has expired."""
    path = run_dir(spec, cluster)
    SharedFilesystemHook.of_cluster(cluster).write_file(str(path / RUN_MARKER), run_marker(spec))
    return path


def lease_shared_dir(spec: dict[str, Any], cluster: dict[str, Any], directory: Path) -> None:
    """Lease ``directory``, which every run of a dataset or an image shares (a dataset mirror, an unpacked image), to
    the run of ``spec``: a file of the run's own under ``LEASES_FOLDER`` holding its ``run_marker``. The reaper
    deletes such a directory once every lease on it has expired and none of their runs is queued or running (and
    one no run leased, never).

    Written before the run looks at the directory or copies into it, so a sweep that lists the leases after that
    keeps the directory. The reaper's deletion looks at the leases again right before it renames the directory away
    to delete it, in one shell command (``deletion.REMOVE_LEASED_DIR``): what is left is a run leasing it between
    that look and the rename, which loses the directory if it had already found it there (an image unpacked, files
    copied) and fails (a retried ``stage_data`` copies again); and a lease written as the reaper removes the
    directory's emptied lease folder, which fails its task the same way.
    """
    relative = directory.relative_to(cluster["shared_dir"]).as_posix()
    path = posixpath.join(cluster["shared_dir"], LEASES_FOLDER, relative, f"{spec['names']['run_key']}.json")
    SharedFilesystemHook.of_cluster(cluster).write_file(path, run_marker(spec))


def upload_sample_corpus(s3: S3Hook, bucket: str) -> str:
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


def mirror_paths(keys: list[str], prefix: str) -> dict[str, str]:
    """The objects among ``keys`` (less folder markers, ``x/``), sorted, by the path under ``prefix`` each is
    mirrored to. A key that is not a plain relative path under ``prefix`` (it could land outside the dataset
    directory) raises ValueError, and so does an object whose path other objects' paths are under (``a`` and
    ``a/b``: one path cannot be a file and a folder)."""
    paths = {key: relative_key(key, prefix) for key in sorted(keys) if not key.endswith("/")}
    folders = folders_of(paths.values())
    if clashing := [key for key, path in paths.items() if path in folders]:
        raise ValueError(
            f"dataset_uri: object {clashing[0]!r} is also a folder of other objects under {prefix!r}; a path can be "
            "a file or a folder, not both"
        )
    return paths


def folders_of(paths: Iterable[str]) -> set[str]:
    """The folders the relative ``paths`` are under: ``a/b/c`` is under ``a/b`` and ``a``."""
    return {path.rsplit("/", depth)[0] for path in paths for depth in range(1, path.count("/") + 1)}


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
    sizes = {obj["Key"]: obj["Size"] for obj in s3.iter_file_metadata(prefix, bucket)}
    names = shard_files(list(sizes), prefix, source)
    if not names:
        raise ValueError(f"dataset_uri: no .txt objects under {source}")
    dest = run_dir(spec, cluster) / "data"
    dest.mkdir(parents=True, exist_ok=True)
    targets = {key: dest / name for key, name in names.items()}
    copied = moved_bytes = 0
    files = []
    for key, target in targets.items():
        if download(s3, bucket, key, sizes[key], target):
            copied += 1
            moved_bytes += sizes[key]
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


def download(s3: S3Hook, bucket: str, key: str, size: int, target: Path) -> bool:
    """Copy the object ``key`` of ``size`` bytes to ``target``, through a temporary name, unless ``target`` is
    already its copy; True when copied.

    Size alone does not tell: an object uploaded again with other content of the same size (a fixed-size shard)
    would keep its old copy. ``target`` is the object's copy when it has the object's size and, as modification
    time, the object's LastModified, which this function gives every file it writes; any other file is copied over.
    """
    # Asked before the copy: an object uploaded again meanwhile leaves a copy with the older time, copied again.
    modified = s3.head_object(key, bucket)["LastModified"]
    if _is_copy(target, size, modified):
        return False
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    s3.get_conn().download_file(bucket, key, str(tmp))
    os.replace(tmp, target)
    # Once renamed: until then the file keeps the time it was last written, by which mirrors tell a temporary file
    # in flight from one left behind.
    os.utime(target, (modified.timestamp(), modified.timestamp()))
    return True


def _is_copy(path: Path, size: int, modified: datetime) -> bool:
    """Whether ``path`` is the copy ``download`` wrote of an object of ``size`` bytes last modified at ``modified``."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    return status.st_size == size and datetime.fromtimestamp(status.st_mtime, UTC) == modified


def s3_folder(uri: str, param: str) -> tuple[str, str]:
    """The bucket and folder prefix of the ``param`` URI ``s3://bucket/prefix``: ``s3://b/corpus`` is the folder
    ``corpus/``, not ``corpus_v2/`` or ``corpus-old.txt`` as well. A URI of another shape raises ValueError."""
    match = S3_URI.match(uri)
    if match is None:
        raise ValueError(f"{param}: got {uri!r}; expected s3://bucket/prefix/")
    return match["bucket"], as_folder(match["prefix"])


def as_folder(prefix: str) -> str:
    """An S3 prefix as a folder: ``a/b`` -> ``a/b/`` (the bucket's root stays empty)."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def is_plain_relative(path: str) -> bool:
    """Whether ``path`` stays below the folder it is joined to, naming a file: not absolute, no empty, ``.`` or
    ``..`` segment."""
    return not any(part in ("", ".", "..") for part in path.split("/"))


def relative_key(key: str, prefix: str, param: str = "dataset_uri") -> str:
    """``key`` under ``prefix`` as a relative path; a key that would leave the destination is refused, naming the
    ``param`` that pointed there."""
    relative = key[len(prefix) :]
    if not is_plain_relative(relative):
        raise ValueError(f"{param}: object {key!r} is not a plain relative path under {prefix!r}")
    return relative


def mirror_dataset(s3: S3Hook, bucket: str, prefix: str, dest: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Make ``dest`` a copy of the objects under ``prefix``, each at the same relative path: copy what it lacks or
    holds with other content, remove the files of objects no longer there (``remove_stale_files``: a framework that
    reads a whole folder would train on them); fail, before any of it, unless ``required`` files are there (a
    framework's dataset is used as it is: DTP does not convert formats)."""
    base = as_folder(prefix)
    sizes = {obj["Key"]: obj["Size"] for obj in s3.iter_file_metadata(base, bucket) if not obj["Key"].endswith("/")}
    keys = sorted(sizes)
    missing = [name for name in required if base + name not in keys]
    if not keys or missing:
        raise ValueError(
            f"dataset_uri: s3://{bucket}/{base} "
            + (f"lacks {', '.join(missing)}" if keys else "holds no objects")
            + (f" (this framework reads {', '.join(required)})" if required else "")
        )
    paths = mirror_paths(keys, base)
    dest.mkdir(parents=True, exist_ok=True)
    # First: an object may now be at a path that was a folder of removed ones, or the other way round.
    removed = remove_stale_files(dest, set(paths.values()))
    for path in removed:
        log.info("Removed %s from %s: no object s3://%s/%s%s any more", path, dest, bucket, base, path)
    copied = moved_bytes = 0
    for key, path in paths.items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if download(s3, bucket, key, sizes[key], target):
            copied += 1
            moved_bytes += sizes[key]
    log.info(
        "Mirrored s3://%s/%s -> %s: %d files, %d copied (%d bytes), %d removed",
        bucket,
        base,
        dest,
        len(keys),
        copied,
        moved_bytes,
        len(removed),
    )
    return {
        "files": len(keys),
        "copied": copied,
        "bytes_moved": moved_bytes,
        "removed": len(removed),
        "dataset_dir": str(dest),
    }


def remove_stale_files(dest: Path, mirrored: set[str]) -> list[str]:
    """Remove the regular files under ``dest`` that are not at one of the ``mirrored`` paths (relative to it), and
    then the folders no mirrored path is under once they are empty; the files' paths. Symbolic links are neither
    removed nor followed, and a temporary file of a download is removed only once nothing has written it for
    ``STALE_DOWNLOAD``: until then it may be a concurrent run's, in flight."""
    folders = folders_of(mirrored)
    written_since = time.time() - STALE_DOWNLOAD.total_seconds()
    removed = []
    for root, subfolders, names, root_fd in os.fwalk(dest, topdown=False):
        under = Path(root).relative_to(dest)
        for name in names:
            path = (under / name).as_posix()
            try:
                status = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
                if path in mirrored or not stat.S_ISREG(status.st_mode):
                    continue
                if DOWNLOAD_TMP.match(name) and status.st_mtime > written_since:
                    continue
                os.unlink(name, dir_fd=root_fd)
            except FileNotFoundError:  # renamed or removed meanwhile, by a concurrent run
                continue
            removed.append(path)
        for name in subfolders:
            if (under / name).as_posix() not in folders:
                with contextlib.suppress(OSError):  # not empty, or a symbolic link
                    os.rmdir(name, dir_fd=root_fd)
    return removed


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
