"""How long the artifacts bucket keeps what runs leave in it.

The artifacts bucket outlives runs, and the large things runs save there would bill forever: a 70B model's
checkpoint is some 850 GB. So checkpoints and profile traces carry the object tag ``dtp:kind`` from their upload on
(``tagged_uploads``; ``tag_objects`` for what FSx exported or an earlier try left), and the bucket's lifecycle
configuration expires regression runs' checkpoints and all traces by that tag, and aborts multipart uploads that
died (their parts bill until then). Reports, metrics, the history and the checkpoints of runs a person triggered
stay. ``ensure_lifecycle`` gives the bucket DTP's rules, recognised
by their ID, and keeps the rules of the bucket's owner as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.exceptions import ClientError

from dtp.naming import TAG_PREFIX
from dtp.pipeline.spec import is_backfill

KIND_TAG = f"{TAG_PREFIX}kind"
# A person's run's checkpoint is what the run was for: kept, as reports are. A scheduled or backfilled regression
# run's (one a day per size) is a by-product of the measurement, and expires.
CHECKPOINT, REGRESSION_CHECKPOINT, TRACE = "checkpoint", "regression-checkpoint", "trace"
# Days after its upload that S3 deletes a regression run's checkpoint: long enough to resume from or copy elsewhere.
CHECKPOINT_DAYS = 30
TRACE_DAYS = 30
# Days after a multipart upload began that S3 deletes the parts of one never completed (a worker that died mid-copy).
INCOMPLETE_UPLOAD_DAYS = 7
# The start of the ID of each lifecycle rule DTP sets; a rule whose ID does not start so is the owner's.
DTP_RULE = TAG_PREFIX


def _expire(kind: str, days: int) -> dict[str, Any]:
    return {
        "ID": f"{DTP_RULE}expire-{kind}s",
        "Status": "Enabled",
        "Filter": {"Tag": {"Key": KIND_TAG, "Value": kind}},
        "Expiration": {"Days": days},
    }


LIFECYCLE_RULES: list[dict[str, Any]] = [
    _expire(REGRESSION_CHECKPOINT, CHECKPOINT_DAYS),
    _expire(TRACE, TRACE_DAYS),
    {
        # S3 takes no tag filter on this action: it applies to the whole bucket.
        "ID": f"{DTP_RULE}abort-incomplete-uploads",
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": INCOMPLETE_UPLOAD_DAYS},
    },
]


def tagged_uploads(aws_conn_id: str | None, kind: str) -> S3Hook:
    """An S3Hook whose uploads (``load_file``, ``load_string``) carry the tag ``dtp:kind=<kind>``: multipart ones
    too, boto3 passing the tags to CreateMultipartUpload."""
    return S3Hook(aws_conn_id=aws_conn_id, extra_args={"Tagging": urlencode({KIND_TAG: kind})})


def tag_objects(s3: S3Hook, bucket: str, keys: Iterable[str], kind: str) -> None:
    """Tag objects that someone else wrote (an FSx export) or an earlier upload left as ``kind``, one request each."""
    for key in keys:
        s3.conn.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": [{"Key": KIND_TAG, "Value": kind}]})


def ensure_lifecycle(s3: S3Hook, bucket: str) -> bool:
    """Give ``bucket`` DTP's ``LIFECYCLE_RULES``, replacing DTP's earlier ones and keeping its owner's; whether it
    had to (nothing is written when DTP's rules are there as they are)."""
    try:
        current = s3.conn.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as err:
        if err.response["Error"]["Code"] != "NoSuchLifecycleConfiguration":
            raise
        current = {}
    rules = current.get("Rules", [])
    owners = [rule for rule in rules if not str(rule.get("ID", "")).startswith(DTP_RULE)]
    if [rule for rule in rules if rule not in owners] == LIFECYCLE_RULES:
        return False
    request: dict[str, Any] = {"Bucket": bucket, "LifecycleConfiguration": {"Rules": [*owners, *LIFECYCLE_RULES]}}
    if "TransitionDefaultMinimumObjectSize" in current:  # the owner's choice, which S3 would otherwise reset
        request["TransitionDefaultMinimumObjectSize"] = current["TransitionDefaultMinimumObjectSize"]
    s3.conn.put_bucket_lifecycle_configuration(**request)
    return True


def checkpoint_kind(spec: dict[str, Any]) -> str:
    """The ``dtp:kind`` of the run's saved checkpoint: a scheduled or backfilled run's expires, any other's stays."""
    regression = spec.get("run_type") in ("scheduled", "backfill") or ("run_id" in spec and is_backfill(spec))
    return REGRESSION_CHECKPOINT if regression else CHECKPOINT
