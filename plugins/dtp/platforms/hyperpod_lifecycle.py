"""A HyperPod run's lifecycle objects: the scripts its nodes run as they are created, under ``<run key>/lifecycle/``
of the lifecycle bucket, which every run shares.

The nodes read them only when they are created, so they go when the cluster's deletion starts: teardown deletes
them, and so does the reaper for a cluster teardown left. The reaper knows a cluster by its tags, not the
connection it was created with (whose ``lifecycle_bucket`` may have changed since), so it reads the bucket from
the cluster's own description (``lifecycle_buckets``).
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.pipeline.results import owned_bucket_exists

log = logging.getLogger(__name__)


def lifecycle_prefix(run_key: str) -> str:
    """Where the run's lifecycle scripts are in the lifecycle bucket."""
    return f"{run_key}/lifecycle/"


def delete_lifecycle_objects(s3: S3Hook, bucket: str, run_key: str) -> int:
    """Delete the run's objects in the lifecycle bucket ``bucket`` (all under its ``<run key>/``); how many (none
    when the bucket is gone, or another account owns it).

    A bucket name is global: once the bucket is deleted, another account may create one of that name, and what it
    holds under the run's prefix is not DTP's to delete."""
    try:
        exists = owned_bucket_exists(s3, bucket, s3.account_id)
    except PermissionError as err:
        log.warning("Deleting none of run %s's lifecycle objects: %s", run_key, err)
        return 0
    keys = (s3.list_keys(bucket, prefix=f"{run_key}/") or []) if exists else []
    if keys:
        s3.delete_objects(bucket, keys)
    return len(keys)


def lifecycle_buckets(described: dict[str, Any], run_key: str) -> list[str]:
    """The buckets the described cluster's instance groups read run ``run_key``'s lifecycle scripts from (DTP's
    ``<run key>/lifecycle/`` there; a group created from anything else names no bucket of DTP's)."""
    buckets = []
    for group in described.get("InstanceGroups", []):
        uri = group.get("LifeCycleConfig", {}).get("SourceS3Uri", "")
        if not uri.startswith("s3://"):
            continue
        bucket, key = S3Hook.parse_s3_url(uri)
        if key.rstrip("/") + "/" == lifecycle_prefix(run_key) and bucket not in buckets:
            buckets.append(bucket)
    return buckets
