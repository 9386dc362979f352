"""Save a run's newest checkpoint to the artifacts bucket before its cluster goes.

A cluster's shared filesystem may go with the cluster (ParallelCluster's own FSx for Lustre file system is
deleted with it), so the checkpoint a run trained to would go too. Before teardown, the training queue's worker
(which sees the shared filesystem) copies it to ``s3://<artifacts>/runs/<run_key>/checkpoints/``, the bucket that
outlives runs, and writes ``MANIFEST.json`` (every file, its size, the step) last: a manifest means the copy is
whole. DTP's trainer's newest complete ``step_N`` folder is saved; another framework's whole checkpoint folder
is saved, less the folders it has not finished (named ``tmp*``). A retry uploads only what is missing.

A later run of the same framework and model may start from a saved checkpoint (its ``resume_from`` param):
``resume_source`` checks the manifest against the run before anything exists, and ``restore_checkpoint`` copies
the files back into the new run's checkpoint folder, where its job resumes from them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, ValidationError

from dtp.params import ParamsError
from dtp.pipeline.data import check_shared_dir_visible, download, relative_key, run_dir, s3_folder
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


def save_checkpoint(spec: dict[str, Any], cluster: dict[str, Any], aws_conn_id: str) -> dict[str, Any]:
    """Copy the run's newest checkpoint to the artifacts bucket; ``{"saved": False}`` when the run wrote none."""
    check_shared_dir_visible(cluster)
    checkpoint_dir = run_dir(spec, cluster) / "checkpoints"
    step, files = checkpoint_files(checkpoint_dir, spec["recipe"]["framework"])
    if not files:
        log.info("No checkpoint in %s: nothing to save", checkpoint_dir)
        return {"saved": False, "checkpoint_dir": str(checkpoint_dir)}
    s3, bucket = S3Hook(aws_conn_id=aws_conn_id), artifacts_bucket(aws_conn_id)
    prefix = f"runs/{spec['names']['run_key']}/checkpoints/"
    existing = {obj["Key"]: obj["Size"] for obj in s3.iter_file_metadata(prefix, bucket)}
    uploaded = uploaded_bytes = total = 0
    entries = []
    for path in files:
        relative, size = path.relative_to(checkpoint_dir).as_posix(), path.stat().st_size
        key = prefix + relative
        if existing.get(key) != size:
            s3.load_file(str(path), key, bucket, replace=True)
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + size
        entries.append({"path": relative, "bytes": size})
        total += size
    recipe = spec["recipe"]
    manifest = {"run_key": spec["names"]["run_key"], "framework": recipe["framework"], "model": recipe["model"],
                "step": step, "bytes": total, "files": entries}  # fmt: skip
    s3.load_string(json.dumps(manifest, indent=1), prefix + MANIFEST, bucket, replace=True)
    uri = f"s3://{bucket}/{prefix}"
    log.info("Saved %s to %s: %d files, %d bytes (%d files uploaded now)", checkpoint_dir, uri, len(files), total,
             uploaded)  # fmt: skip
    return {"saved": True, "uri": uri, "step": step, "files": len(files), "bytes": total, "uploaded": uploaded,
            "uploaded_bytes": uploaded_bytes}  # fmt: skip


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
