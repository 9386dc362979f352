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

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from dtp.naming import REGRESSION_DAG_PREFIX, TAG_PREFIX
from dtp.pipeline.spec import is_backfill

log = logging.getLogger(__name__)

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


# Why an object may be left untagged, or the bucket without DTP's rules: kept, the safe side, never a failed run.
NOT_ALLOWED = (
    "the worker's policy lacks s3:PutObjectTagging or s3:*LifecycleConfiguration (docs/iam/dtp-worker-policy.json): "
    "what it writes there is kept, not expired"
)


def _denied(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") in ("AccessDenied", "AccessDeniedException")


def _client_error(err: BaseException | None) -> ClientError | None:
    """The S3 refusal behind ``err``: itself, or the ClientError it was raised from or while handling (boto3's file
    transfer, behind ``load_file``, raises S3UploadFailedError while handling S3's ClientError)."""
    while err is not None and not isinstance(err, ClientError):
        err = err.__cause__ or err.__context__
    return err


class TaggedUploadsHook(S3Hook):
    """``S3Hook`` whose uploads (``load_file``, ``load_string``) carry the tag ``dtp:kind=<kind>``: multipart ones
    too, boto3 passing the tags to CreateMultipartUpload. A worker whose policy predates the tags (PutObject allowed,
    its tagging not) uploads untagged, with a warning: the object is kept, and the run's save does not fail."""

    def __init__(self, aws_conn_id: str | None, kind: str) -> None:
        super().__init__(aws_conn_id=aws_conn_id, extra_args={"Tagging": urlencode({KIND_TAG: kind})})

    def load_file(self, *args: Any, **kwargs: Any) -> None:
        self._untagged_if_denied(super().load_file, *args, **kwargs)

    def load_string(self, *args: Any, **kwargs: Any) -> None:
        self._untagged_if_denied(super().load_string, *args, **kwargs)

    def _untagged_if_denied(self, upload: Any, *args: Any, **kwargs: Any) -> None:
        try:
            upload(*args, **kwargs)
        except (ClientError, S3UploadFailedError) as err:
            refusal = _client_error(err)
            if refusal is None or not _denied(refusal) or "Tagging" not in self._extra_args:
                raise
            log.warning("Uploading without the dtp:kind tag: %s (%s)", NOT_ALLOWED, refusal)
            self._extra_args = {name: value for name, value in self._extra_args.items() if name != "Tagging"}
            upload(*args, **kwargs)


def tagged_uploads(aws_conn_id: str | None, kind: str) -> S3Hook:
    """An S3Hook whose uploads carry the tag ``dtp:kind=<kind>`` (``TaggedUploadsHook``)."""
    return TaggedUploadsHook(aws_conn_id, kind)


def tag_objects(s3: S3Hook, bucket: str, keys: Iterable[str], kind: str) -> None:
    """Tag objects that someone else wrote (an FSx export) or an earlier upload left as ``kind``, one request each;
    a worker not allowed to leaves them untagged (kept), with a warning."""
    for key in keys:
        try:
            s3.conn.put_object_tagging(Bucket=bucket, Key=key, Tagging={"TagSet": [{"Key": KIND_TAG, "Value": kind}]})
        except ClientError as err:
            if not _denied(err):
                raise
            log.warning("Leaving the objects under %s untagged: %s (%s)", key.rpartition("/")[0], NOT_ALLOWED, err)
            return


def ensure_lifecycle(s3: S3Hook, bucket: str) -> bool:
    """Give ``bucket`` DTP's ``LIFECYCLE_RULES``, replacing DTP's earlier ones and keeping its owner's; whether it
    had to (nothing is written when DTP's rules are there as they are). Retention never fails a run: a worker not
    allowed to, or a configuration S3 refuses to merge with (an owner's rule in the old ``Prefix`` form), is
    logged, and the bucket keeps what it has."""
    try:
        return _ensure_lifecycle(s3, bucket)
    except (ClientError, BotoCoreError) as err:
        if isinstance(err, ClientError) and _denied(err):
            log.warning("Could not give bucket %s DTP's lifecycle rules (%s): %s", bucket, err, NOT_ALLOWED)
        else:
            log.warning("Could not give bucket %s DTP's lifecycle rules, it keeps what it has: %s", bucket, err)
        return False


def _ensure_lifecycle(s3: S3Hook, bucket: str) -> bool:
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
    """The ``dtp:kind`` of the run's saved checkpoint: a regression run's (scheduled, backfilled, or a regression
    DAG's triggered by hand: most sizes have no schedule) expires, any other's stays."""
    regression = (
        spec.get("run_type") in ("scheduled", "backfill")
        or str(spec.get("dag_id", "")).startswith(REGRESSION_DAG_PREFIX)
        or ("run_id" in spec and is_backfill(spec))
    )
    return REGRESSION_CHECKPOINT if regression else CHECKPOINT
