"""A framework's dataset mirrored, as it is, from S3 into the directory its job reads, which every run of the dataset
shares: each object at its path under ``dataset_uri``, copied unless its copy is already there, and the files of
objects no longer there removed (a framework that reads a whole folder would train on them)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.pipeline.frameworks import dataset_files_problem
from dtp.pipeline.s3_objects import DOWNLOAD_TMP, as_folder, bytes_to_copy, check_room, download_all, relative_key

log = logging.getLogger(__name__)
# How long a temporary file of a download goes unwritten before a mirror takes it for one whose run is gone.
STALE_DOWNLOAD = timedelta(hours=1)


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


def mirror_dataset(s3: S3Hook, bucket: str, prefix: str, dest: Path, framework: str) -> dict[str, Any]:
    """Make ``dest`` a copy of the objects under ``prefix``, each at the same relative path: copy what it lacks or
    holds with other content, remove the files of objects no longer there (``remove_stale_files``: a framework that
    reads a whole folder would train on them); fail, before any of it, unless the objects are a dataset in
    ``framework``'s format (``dataset_files_problem``: a framework's dataset is used as it is, DTP does not convert
    formats) and ``dest``'s file system has room for the objects still to copy."""
    base = as_folder(prefix)
    listed = {obj["Key"]: obj for obj in s3.iter_file_metadata(base, bucket) if not obj["Key"].endswith("/")}
    keys = sorted(listed)
    problem = dataset_files_problem(framework, lambda name: base + name in listed)
    if problem or not keys:
        raise ValueError(f"dataset_uri: s3://{bucket}/{base} {problem or 'holds no objects'}")
    paths = mirror_paths(keys, base)
    check_room(dest, bytes_to_copy((listed[key], dest / path) for key, path in paths.items()))
    dest.mkdir(parents=True, exist_ok=True)
    # First: an object may now be at a path that was a folder of removed ones, or the other way round.
    removed = remove_stale_files(dest, set(paths.values()))
    for path in removed:
        log.info("Removed %s from %s: no object s3://%s/%s%s any more", path, dest, bucket, base, path)
    copies = ((key, listed[key]["Size"], listed[key]["LastModified"], dest / path) for key, path in paths.items())
    copied, moved_bytes = download_all(s3, bucket, copies)
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
