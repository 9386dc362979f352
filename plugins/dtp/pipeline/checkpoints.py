"""Save a run's newest checkpoint to the artifacts bucket before its cluster goes.

A cluster's shared filesystem may go with the cluster (ParallelCluster's own FSx for Lustre file system is
deleted with it), so the checkpoint a run trained to would go too. Before teardown, the training queue's worker
(which sees the shared filesystem) copies it to ``s3://<artifacts>/runs/<run_key>/checkpoints/``, the bucket that
outlives runs, and writes ``MANIFEST.json`` (every file, its size, the step) last: a manifest means the copy is
whole. DTP's trainer's newest complete ``step_N`` folder is saved; another framework's whole checkpoint folder
is saved, less the folders it has not finished (named ``tmp*``). A retry uploads only what is missing.
``SaveCheckpointOperator`` does the saving, and has FSx for Lustre export the files where it can.

A later run of the same framework and model may start from a saved checkpoint (its ``resume_from`` param):
``resume_source`` checks the manifest against the run before anything exists, and ``restore_checkpoint`` copies
the files back into the new run's checkpoint folder, where its job resumes from them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError

from dtp.params import ParamsError
from dtp.pipeline.data import RUNS_FOLDER, check_shared_dir_visible, download, relative_key, run_dir, s3_folder
from dtp.pipeline.results import artifacts_bucket

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"


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
    return Checkpoint(directory, step, files, artifacts_bucket(aws_conn_id), prefix)


def upload_checkpoint(checkpoint: Checkpoint, aws_conn_id: str) -> dict[str, int]:
    """Upload the checkpoint's files that the bucket lacks or holds with another size; how many, and their bytes."""
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    existing = {obj["Key"]: obj["Size"] for obj in s3.iter_file_metadata(checkpoint.prefix, checkpoint.bucket)}
    uploaded = uploaded_bytes = 0
    for path in checkpoint.files:
        key, size = checkpoint.prefix + checkpoint.relative(path), path.stat().st_size
        if existing.get(key) != size:
            s3.load_file(str(path), key, checkpoint.bucket, replace=True)
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + size
    log.info("Uploaded %d of %d files (%d bytes) to %s", uploaded, len(checkpoint.files), uploaded_bytes,
             checkpoint.uri)  # fmt: skip
    return {"uploaded": uploaded, "uploaded_bytes": uploaded_bytes}


def write_manifest(spec: dict[str, Any], checkpoint: Checkpoint, aws_conn_id: str) -> dict[str, Any]:
    """Write ``MANIFEST.json`` once every file is in the bucket, marking the copy whole; what it records."""
    sizes = {checkpoint.relative(path): path.stat().st_size for path in checkpoint.files}
    entries = [{"path": relative, "bytes": size} for relative, size in sizes.items()]
    total = sum(sizes.values())
    recipe = spec["recipe"]
    manifest = {"run_key": spec["names"]["run_key"], "framework": recipe["framework"], "model": recipe["model"],
                "step": checkpoint.step, "bytes": total, "files": entries}  # fmt: skip
    S3Hook(aws_conn_id=aws_conn_id).load_string(
        json.dumps(manifest, indent=1), checkpoint.prefix + MANIFEST, checkpoint.bucket, replace=True
    )
    log.info("Saved %s to %s: %d files, %d bytes", checkpoint.directory, checkpoint.uri, len(entries), total)
    return {"saved": True, "uri": checkpoint.uri, "step": checkpoint.step, "files": len(entries), "bytes": total}


def _location(uri: str) -> tuple[str, str]:
    try:
        return s3_folder(uri, "resume_from")
    except ValueError as err:
        raise ParamsError(f"invalid parameters:\n{err}") from None


class _ManifestFile(BaseModel):
    path: str
    bytes: int = Field(ge=0)


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
        raise ParamsError(
            f"invalid parameters:\nresume_from: cannot read {where}: {err.response['Error']['Code']}"
        ) from None
    try:
        return _Manifest.model_validate_json(text).model_dump()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()[:3])
        raise ParamsError(
            f"invalid parameters:\nresume_from: {where} is not a manifest save_checkpoint wrote ({problems})"
        ) from None


def resume_source(spec: dict[str, Any], aws_conn_id: str) -> dict[str, Any] | None:
    """The checkpoint ``resume_from`` names (None when the run starts from scratch), refused unless a whole copy
    is there (its manifest), of the run's framework and model, at a step before ``max_steps``."""
    uri = spec["params"]["resume_from"]
    if not uri:
        return None
    bucket, prefix = _location(uri)
    manifest = _manifest(S3Hook(aws_conn_id=aws_conn_id), bucket, prefix)
    if manifest is None:
        raise ParamsError(
            f"invalid parameters:\nresume_from: no {MANIFEST} under s3://{bucket}/{prefix}: not a checkpoint "
            "saved by a run's save_checkpoint, or its copy did not finish"
        )
    recipe, problems = spec["recipe"], []
    for field in ("framework", "model"):
        if manifest.get(field) != recipe[field]:
            problems.append(f"it holds a {field} {manifest.get(field)!r} checkpoint; recipe {recipe['name']!r} "
                            f"trains {recipe[field]!r}")  # fmt: skip
    step, max_steps = manifest.get("step"), spec["params"]["max_steps"]
    if step is not None and step >= max_steps:
        problems.append(f"its step {step} is not before max_steps ({max_steps}): there would be nothing to train")
    if problems:
        raise ParamsError("invalid parameters:\n" + "\n".join(f"resume_from: {problem}" for problem in problems))
    return {"uri": f"s3://{bucket}/{prefix}", "step": step, "files": len(manifest["files"]), "bytes": manifest["bytes"],
            "from_run": manifest["run_key"]}  # fmt: skip


def restore_checkpoint(spec: dict[str, Any], cluster: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Copy the checkpoint ``resume_source`` accepted into the run's checkpoint folder (files already there with
    their size are not copied again; each is written under a temporary name and renamed)."""
    source = spec["resume"]
    bucket, prefix = _location(source["uri"])
    s3 = S3Hook(aws_conn_id=aws_conn_id)
    manifest = _manifest(s3, bucket, prefix)
    if manifest is None:
        raise FileNotFoundError(f"{source['uri']}{MANIFEST} is gone since validate_params read it")
    dest = run_dir(spec, cluster) / "checkpoints"
    copied = moved_bytes = 0
    for entry in manifest["files"]:
        target = dest / relative_key(prefix + entry["path"], prefix, "resume_from")
        target.parent.mkdir(parents=True, exist_ok=True)
        if download(s3, bucket, prefix + entry["path"], entry["bytes"], target):
            copied, moved_bytes = copied + 1, moved_bytes + entry["bytes"]
    log.info("Restored %s (step %s) into %s: %d files, %d copied (%d bytes)", source["uri"], manifest["step"], dest,
             len(manifest["files"]), copied, moved_bytes)  # fmt: skip
    return {**source, "copied": copied, "bytes_moved": moved_bytes}
