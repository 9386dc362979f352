"""The metrics history store: one JSON object per run in the artifacts bucket.

Chosen over a table in Airflow's metadata database: history outlives any one
Airflow installation (a rebuilt MWAA environment, a new local stack), is
shared by every environment that trains the same recipe, and is queryable
with Athena. Objects are keyed ``history/<recipe>/<platform>/<instance>/<time>-<run>.json``
so "the last N runs of this recipe on this hardware" is one listing (the instance type the run asked for: an
entry keeps the one a capacity fallback gave it as ``actual_instance_type``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

HISTORY_PREFIX = "history"
RECORDED_METRICS = (
    "final_loss",
    "first_loss",
    "median_tokens_per_s",
    "mfu",
    "max_memory_mb",
    "last_step",
    "world_size",
)


def _prefix(recipe: str, platform: str, instance_type: str) -> str:
    return f"{HISTORY_PREFIX}/{recipe}/{platform}/{instance_type}/"


def record(s3: S3Hook, bucket: str, spec: dict[str, Any], metrics: dict[str, Any], passed: bool) -> str:
    """Store this run's summary and whether it passed its gates; re-recording the same run overwrites its one
    object."""
    params = spec["params"]
    now = datetime.now(UTC)
    entry = {
        "run_key": spec["names"]["run_key"],
        "dag_id": spec["dag_id"],
        "run_id": spec["run_id"],
        # Which date a backfill ran, whether the run was scheduled, backfilled or manual, and which clear of it
        # (None for a run validated before the spec carried them).
        "logical_date": spec.get("logical_date"),
        "run_type": spec.get("run_type"),
        "incarnation": spec.get("incarnation"),
        "recipe": params["recipe"],
        "platform": params["platform"],
        "instance_type": params["instance_type"],
        "num_nodes": params["num_nodes"],
        "max_steps": params["max_steps"],
        "dataset_uri": params["dataset_uri"],
        "profile_steps": params["profile_steps"],
        # What collect_metrics found the run trained with (dtp.metrics.gates.COMPARED_PARAMS): the recipe's content,
        # the image (and AMI), the instance type the cluster got, a capacity fallback's where it got one, and the
        # digest of its extra_env (never the values: they may hold tokens).
        "recipe_digest": metrics.get("recipe_digest"),
        "runtime": metrics.get("runtime"),
        "actual_instance_type": metrics.get("actual_instance_type"),
        "extra_env_digest": metrics.get("extra_env_digest"),
        "passed": passed,
        "recorded_at": now.isoformat(timespec="seconds"),
        **{k: metrics.get(k) for k in RECORDED_METRICS},
    }
    prefix = _prefix(params["recipe"], params["platform"], params["instance_type"])
    for key in s3.list_keys(bucket, prefix=prefix) or []:
        if key.endswith(f"-{entry['run_key']}.json"):
            s3.delete_objects(bucket, [key])
    key = f"{prefix}{now.strftime('%Y%m%dT%H%M%S')}-{entry['run_key']}.json"
    s3.load_string(json.dumps(entry), key, bucket, replace=True)
    return key


def recent(
    s3: S3Hook,
    bucket: str,
    recipe: str,
    platform: str,
    instance_type: str,
    *,
    where: Callable[[dict[str, Any]], bool],
    newest: int,
    passed: int,
    max_reads: int = 500,
) -> list[dict[str, Any]]:
    """Entries of this recipe on this hardware that match ``where``, oldest first: the ``newest`` of them, and
    older ones until ``passed`` of them passed their gates, so that neither runs of other shapes nor a streak of
    failed runs push the last passing ones (the regression gates' baseline) out of the window. Reads at most
    ``max_reads`` entries, newest first."""
    keys = sorted(s3.list_keys(bucket, prefix=_prefix(recipe, platform, instance_type)) or [])
    found: list[dict[str, Any]] = []
    for key in reversed(keys[-max_reads:]):
        entry = json.loads(s3.read_key(key, bucket))
        if where(entry):
            found.append(entry)
        if len(found) >= newest and sum(e.get("passed", True) for e in found) >= passed:
            break
    return found[::-1]
