"""S3 objects as files: the bucket and folder an ``s3://`` URI names, the relative path a key under that folder is
copied to, ``download``, which copies an object to a file unless the file is already its copy, and ``check_room``,
which refuses copies the destination's file system has no room for."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)$")
# A temporary file of ``download`` (``.NAME.1a2b3c4d.tmp``), or boto3's while it writes one (8 hex digits more).
DOWNLOAD_TMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[0-9a-fA-F]{8})?$")


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


def download(s3: S3Hook, bucket: str, key: str, size: int, target: Path, modified: datetime) -> bool:
    """Copy the object ``key`` of ``size`` bytes, last modified at ``modified``, to ``target``, through a temporary
    name, unless ``target`` is already its copy; True when copied. ``size`` and ``modified`` are as the listing
    that found the object gives them: known before the copy, so an object uploaded again meanwhile leaves a copy
    with the older time, copied again next time.

    Size alone does not tell: an object uploaded again with other content of the same size (a fixed-size shard)
    would keep its old copy. ``target`` is the object's copy when it has the object's size and, as modification
    time, the object's LastModified, which this function gives every file it writes; any other file is copied over.
    """
    if is_copy(target, size, modified):
        return False
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    s3.get_conn().download_file(bucket, key, str(tmp))
    os.replace(tmp, target)
    # Once renamed: until then the file keeps the time it was last written, by which mirrors tell a temporary file
    # in flight from one left behind.
    os.utime(target, (modified.timestamp(), modified.timestamp()))
    return True


def download_all(s3: S3Hook, bucket: str, copies: Iterable[tuple[str, int, datetime, Path]]) -> tuple[int, int]:
    """``download`` each of ``copies`` (key, size, LastModified, target file; the target's folder made first): how
    many files it copied, and their bytes."""
    copied = moved_bytes = 0
    for key, size, modified, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        if download(s3, bucket, key, size, target, modified):
            copied, moved_bytes = copied + 1, moved_bytes + size
    return copied, moved_bytes


def is_copy(path: Path, size: int, modified: datetime) -> bool:
    """Whether ``path`` is the copy ``download`` wrote of an object of ``size`` bytes last modified at ``modified``."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    return status.st_size == size and datetime.fromtimestamp(status.st_mtime, UTC) == modified


class NoRoomToCopy(RuntimeError):
    """The file system a copy goes to has fewer bytes free than the copy needs."""


def bytes_to_copy(copies: Iterable[tuple[Mapping[str, Any], Path]]) -> int:
    """The bytes ``download`` would copy of ``copies``, each an object as its listing gives it (``Size``,
    ``LastModified``) and the file it is copied to: those of the objects whose file is not already their copy."""
    return sum(obj["Size"] for obj, target in copies if not is_copy(target, obj["Size"], obj["LastModified"]))


def check_room(directory: Path, needed: int) -> None:
    """Fail unless the file system ``directory`` is on (where it does not exist yet, its nearest folder that does)
    has ``needed`` bytes free."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise NoRoomToCopy(
            f"{directory}: staging needs {needed} bytes ({needed / 2**30:.1f} GiB) there, and its file system has "
            f"{free} bytes ({free / 2**30:.1f} GiB) free: free some space or give the shared file system more"
        )
