"""Save a run's newest checkpoint to the artifacts bucket before its cluster goes.

A cluster's shared filesystem may go with the cluster (ParallelCluster's own FSx for Lustre file system is
deleted with it), so the checkpoint a run trained to would go too. Before teardown, the training queue's worker
(which sees the shared filesystem) copies it to ``s3://<artifacts>/runs/<run_key>/checkpoints/``, the bucket that
outlives runs, and writes ``MANIFEST.json`` (every file, its size, the step) last: a manifest means the copy is
whole. DTP's trainer's newest complete ``step_N`` folder is saved; another framework's whole checkpoint folder
is saved, less the folders it has not finished (named ``tmp*``). A retry uploads only what the bucket lacks or
holds with other content.
``SaveCheckpointOperator`` does the saving, and has FSx for Lustre export the files where it can. Every object of
the copy carries the tag ``dtp:kind``: a regression run's (``regression-checkpoint``: a regression DAG's, or a
backfilled one) is deleted by the bucket's lifecycle rules ``CHECKPOINT_DAYS`` after it was written, any other
run's (``checkpoint``) is kept (``dtp.pipeline.retention.checkpoint_kind``).

A later run of the same framework and model may start from a saved checkpoint (its ``resume_from`` param):
``resume_source`` checks the manifest against the run before anything exists, and ``restore_checkpoint`` copies
the files back into the new run's checkpoint folder, where its job resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError, field_validator
from s3transfer.utils import ChunksizeAdjuster

from dtp.form_params import ParamsError
from dtp.pipeline.data import check_shared_dir_visible
from dtp.pipeline.results import artifacts_bucket
from dtp.pipeline.retention import CHECKPOINT_DAYS, checkpoint_kind, tag_objects, tagged_uploads
from dtp.pipeline.run_dirs import RUNS_FOLDER, run_dir
from dtp.pipeline.s3_objects import download_all, is_plain_relative, relative_key, s3_folder

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"
HASH_BLOCK = 1 << 20  # bytes read at a time while hashing a file
# How far the clock of the node that wrote a file may be behind S3's: an object newer than the file by less is
# compared by content.
CLOCK_SKEW = timedelta(minutes=1)
# Why a checkpoint a run saved may be gone, as a refused resume_from says.
EXPIRY = f"the artifacts bucket deletes a regression run's checkpoint {CHECKPOINT_DAYS} days after it was saved"


def checkpoint_files(checkpoint_dir: Path, framework: str) -> tuple[int | None, list[Path]]:
    """The step and the files to save: DTP's trainer's newest ``step_N`` (renamed from ``tmp-step_N`` once every
    rank has written it, so whole); for other frameworks every file not under a ``tmp*`` folder."""
    if not checkpoint_dir.is_dir():
        return None, []
    if framework == "fsdp":
        steps = {int(m[1]): p for p in checkpoint_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))}
        if not steps:
            return None, []
        newest = max(steps)
        return newest, sorted(p for p in steps[newest].rglob("*") if p.is_file())
    files = sorted(
        p
        for p in checkpoint_dir.rglob("*")
        if p.is_file() and not any(part.startswith("tmp") for part in p.relative_to(checkpoint_dir).parts)
    )
    return None, files


@dataclass(frozen=True)
class Checkpoint:
    """A run's newest checkpoint on the shared filesystem, and where in the artifacts bucket it is saved."""

    directory: Path  # the run's checkpoint folder; ``files`` are under it
    step: int | None
    files: list[Path]
    bucket: str
    prefix: str  # runs/<run_key>/checkpoints/
    kind: str  # its objects' dtp:kind tag (``retention.checkpoint_kind``)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.directory).as_posix()


def newest_checkpoint(spec: dict[str, Any], cluster: dict[str, Any], aws_conn_id: str) -> Checkpoint | None:
    """The run's checkpoint to save; None when it wrote none."""
    check_shared_dir_visible(cluster)
    directory = run_dir(spec, cluster) / "checkpoints"
    step, files = checkpoint_files(directory, spec["recipe"]["framework"])
    if not files:
        log.info("No checkpoint in %s: nothing to save", directory)
        return None
    prefix = f"{RUNS_FOLDER}/{spec['names']['run_key']}/checkpoints/"
    return Checkpoint(directory, step, files, artifacts_bucket(aws_conn_id), prefix, checkpoint_kind(spec))


def upload_checkpoint(checkpoint: Checkpoint, aws_conn_id: str) -> dict[str, int]:
    """Upload the checkpoint's files that the bucket lacks or holds with other content; how many, and their bytes.

    Size alone does not tell: a checkpoint rewrites files in place with the same size (Megatron-LM's
    ``latest_checkpointed_iteration.txt`` going from "100" to "300", a shard of a step trained again), and a copy
    keeping the old one would resume from the wrong step. An object written more than ``CLOCK_SKEW`` after the
    file last changed is its copy (an FSx export of this checkpoint, or an earlier try of this upload). Any other
    of the same size is compared by content: the file is hashed and compared with the object's ETag, which S3
    computes from the content as uploaded (the MD5, or for a multipart upload the MD5 of its parts' MD5s: ``etag``
    computes it with the part size this upload uses). An object whose ETag is not of that kind (another part size,
    a KMS-encrypted bucket) is uploaded again, the safe side. Uploads carry the checkpoint's tag; an object kept
    (an FSx export's, an earlier try's) is given it."""
    s3 = tagged_uploads(aws_conn_id, checkpoint.kind)
    existing = {obj["Key"]: obj for obj in s3.iter_file_metadata(checkpoint.prefix, checkpoint.bucket)}
    threshold, part_size = s3.transfer_config.multipart_threshold, s3.transfer_config.multipart_chunksize
    uploaded = uploaded_bytes = 0
    kept = []
    for path in checkpoint.files:
        key, size = checkpoint.prefix + checkpoint.relative(path), path.stat().st_size
        if _stored_as_is(existing.get(key), path, threshold, part_size):
            kept.append(key)
        else:
            s3.load_file(str(path), key, checkpoint.bucket, replace=True)
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + size
    tag_objects(s3, checkpoint.bucket, kept, checkpoint.kind)
    log.info("Uploaded %d of %d files (%d bytes) to %s", uploaded, len(checkpoint.files), uploaded_bytes,
             checkpoint.uri)  # fmt: skip
    return {"uploaded": uploaded, "uploaded_bytes": uploaded_bytes}


def tag_checkpoint(checkpoint: Checkpoint, aws_conn_id: str) -> None:
    """Give the checkpoint's objects, which FSx exported untagged, the tag that has the bucket expire them."""
    keys = (checkpoint.prefix + checkpoint.relative(path) for path in checkpoint.files)
    tag_objects(S3Hook(aws_conn_id=aws_conn_id), checkpoint.bucket, keys, checkpoint.kind)


def _stored_as_is(stored: dict[str, Any] | None, path: Path, threshold: int, part_size: int) -> bool:
    """Whether the bucket's object ``stored`` (its listing entry) holds the file at ``path`` as it is now."""
    if stored is None or stored["Size"] != path.stat().st_size:
        return False
    if stored["LastModified"] >= datetime.fromtimestamp(path.stat().st_mtime, UTC) + CLOCK_SKEW:
        return True
    return bool(stored["ETag"].strip('"') == etag(path, threshold, part_size))


def etag(path: Path, multipart_threshold: int, part_size: int) -> str:
    """The ETag S3 gives ``path`` uploaded as boto3 uploads it (without KMS): the MD5 of a file smaller than
    ``multipart_threshold``; else the MD5 of its parts' MD5s and their count, the parts ``part_size`` bytes (boto3
    raises it to keep a file within S3's 10,000 parts)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        if size < multipart_threshold:
            return hashlib.file_digest(file, _md5).hexdigest()
        part_size = ChunksizeAdjuster().adjust_chunksize(part_size, size)
        parts = [_part_md5(file, part_size) for _ in range(-(-size // part_size))]
    return f"{_md5(b''.join(parts)).hexdigest()}-{len(parts)}"


def _part_md5(file: BinaryIO, size: int) -> bytes:
    """The MD5 of the next ``size`` bytes of ``file`` (fewer at its end)."""
    digest = _md5()
    while size and (block := file.read(min(HASH_BLOCK, size))):
        digest.update(block)
        size -= len(block)
    return digest.digest()


def _md5(data: bytes = b"") -> Any:
    return hashlib.md5(data, usedforsecurity=False)  # the algorithm of S3's ETags, not a security check


def write_manifest(spec: dict[str, Any], checkpoint: Checkpoint, aws_conn_id: str) -> dict[str, Any]:
    """Write ``MANIFEST.json`` once every file is in the bucket, marking the copy whole; what it records."""
    sizes = {checkpoint.relative(path): path.stat().st_size for path in checkpoint.files}
    entries = [{"path": relative, "bytes": size} for relative, size in sizes.items()]
    total = sum(sizes.values())
    recipe = spec["recipe"]
    manifest = {"run_key": spec["names"]["run_key"], "framework": recipe["framework"], "model": recipe["model"],
                "step": checkpoint.step, "bytes": total, "files": entries}  # fmt: skip
    tagged_uploads(aws_conn_id, checkpoint.kind).load_string(
        json.dumps(manifest, indent=1), checkpoint.prefix + MANIFEST, checkpoint.bucket, replace=True
    )
    log.info("Saved %s to %s: %d files, %d bytes", checkpoint.directory, checkpoint.uri, len(entries), total)
    return {"saved": True, "uri": checkpoint.uri, "step": checkpoint.step, "files": len(entries), "bytes": total}


def _location(uri: str) -> tuple[str, str]:
    try:
        return s3_folder(uri, "resume_from")
    except ValueError as err:
        raise ParamsError.from_problems(str(err)) from None


class _ManifestFile(BaseModel):
    path: str
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _plain(cls, path: str) -> str:
        """A path restore_checkpoint writes below the new run's checkpoint folder: refused here, while
        validate_params reads the manifest, rather than once the run's cluster exists."""
        if not is_plain_relative(path) or any(c in path for c in "\\\0"):
            raise ValueError(
                f"got {path!r}; expected a relative path below the checkpoint folder: not absolute, no empty, '.' or "
                "'..' segment, no backslash or NUL"
            )
        return path


class _Manifest(BaseModel):
    """What ``save_checkpoint`` writes last: the copy's files, their sizes, and what trained them."""

    run_key: str
    framework: str
    model: str
    step: int | None
    bytes: int = Field(ge=0)
    files: list[_ManifestFile]


def _manifest(s3: S3Hook, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The checkpoint's manifest (None when there is none); one that cannot be read or is not a manifest is
    refused naming what is wrong, as a bad ``resume_from``."""
    where = f"s3://{bucket}/{prefix}{MANIFEST}"
    try:
        if not s3.check_for_key(prefix + MANIFEST, bucket):
            return None
        text = s3.read_key(prefix + MANIFEST, bucket)
    except ClientError as err:
        raise ParamsError.from_problems(f"resume_from: cannot read {where}: {err.response['Error']['Code']}") from None
    try:
        return _Manifest.model_validate_json(text).model_dump()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()[:3])
        raise ParamsError.from_problems(
            f"resume_from: {where} is not a manifest save_checkpoint wrote ({problems})"
        ) from None


def resume_source(spec: dict[str, Any], aws_conn_id: str) -> dict[str, Any] | None:
    """The checkpoint ``resume_from`` names (None when the run starts from scratch), refused unless a whole copy
    is there (its manifest, and every file it lists: the bucket expires a manifest no sooner than its files), of
    the run's framework and model, at a step before ``max_steps``."""
    uri = spec["params"]["resume_from"]
    if not uri:
        return None
    bucket, prefix = _location(uri)
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    manifest = _manifest(s3, bucket, prefix)
    if manifest is None:
        raise ParamsError.from_problems(
            f"resume_from: no {MANIFEST} under s3://{bucket}/{prefix}: not a checkpoint saved by a run's "
            f"save_checkpoint, its copy did not finish, or it has expired ({EXPIRY})"
        )
    recipe, problems = spec["recipe"], []
    for field in ("framework", "model"):
        if manifest.get(field) != recipe[field]:
            problems.append(f"it holds a {field} {manifest.get(field)!r} checkpoint; recipe {recipe['name']!r} "
                            f"trains {recipe[field]!r}")  # fmt: skip
    step, max_steps = manifest.get("step"), spec["params"]["max_steps"]
    if step is not None and step >= max_steps:
        problems.append(f"its step {step} is not before max_steps ({max_steps}): there would be nothing to train")
    stored = {obj["Key"] for obj in s3.iter_file_metadata(prefix, bucket)}
    if missing := [entry["path"] for entry in manifest["files"] if prefix + entry["path"] not in stored]:
        problems.append(f"{len(missing)} of the {len(manifest['files'])} files its {MANIFEST} lists are gone ("
                        f"{', '.join(missing[:5])}): it may have expired ({EXPIRY})")  # fmt: skip
    if problems:
        raise ParamsError.from_problems(*(f"resume_from: {problem}" for problem in problems))
    return {"uri": f"s3://{bucket}/{prefix}", "step": step, "files": len(manifest["files"]), "bytes": manifest["bytes"],
            "from_run": manifest["run_key"]}  # fmt: skip


def restore_checkpoint(spec: dict[str, Any], cluster: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Copy the checkpoint ``resume_source`` accepted into the run's checkpoint folder (a file already there as
    ``download``'s copy of its object, with its size and LastModified, is not copied again; each is written under a
    temporary name and renamed)."""
    source = spec["resume"]
    bucket, prefix = _location(source["uri"])
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    manifest = _manifest(s3, bucket, prefix)
    if manifest is None:
        raise FileNotFoundError(f"{source['uri']}{MANIFEST} is gone since validate_params read it")
    dest = run_dir(spec, cluster) / "checkpoints"
    # One listing gives every file's LastModified, which tells a copy already there from one to make.
    modified = {obj["Key"]: obj["LastModified"] for obj in s3.iter_file_metadata(prefix, bucket)}
    if missing := [entry["path"] for entry in manifest["files"] if prefix + entry["path"] not in modified]:
        raise FileNotFoundError(f"{source['uri']}{MANIFEST} names files that are gone: {', '.join(missing[:10])}")
    keys = {prefix + entry["path"]: entry["bytes"] for entry in manifest["files"]}
    copies = ((key, size, modified[key], dest / relative_key(key, prefix, "resume_from")) for key, size in keys.items())
    copied, moved_bytes = download_all(s3, bucket, copies)
    log.info("Restored %s (step %s) into %s: %d files, %d copied (%d bytes)", source["uri"], manifest["step"], dest,
             len(manifest["files"]), copied, moved_bytes)  # fmt: skip
    return {**source, "copied": copied, "bytes_moved": moved_bytes}
