"""The artifacts bucket's lifecycle rules, against moto's S3: a bucket DTP creates gets them, one it made before them
gets them on its next use, and the rules of the bucket's owner stay as they are; profile traces carry the tag the
rules expire them by, and the run's metrics do not."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from boto3.exceptions import S3UploadFailedError
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto.core import DEFAULT_ACCOUNT_ID

from dtp.pipeline import retention
from dtp.pipeline.results import artifacts_bucket, upload_profile
from dtp.pipeline.retention import LIFECYCLE_RULES, ensure_lifecycle

ARTIFACTS = f"dtp-artifacts-{DEFAULT_ACCOUNT_ID}-us-east-1"
# A rule of the account's owner: DTP keeps it as it is.
OWNERS_RULE = {
    "ID": "archive-reports",
    "Status": "Enabled",
    "Filter": {"Prefix": "validation/"},
    "Transitions": [{"Days": 90, "StorageClass": "GLACIER"}],
}
MIB = 1 << 20


@pytest.fixture
def s3(moto_aws) -> Any:
    return moto_aws("s3")


def rules(s3: Any) -> dict[str, dict[str, Any]]:
    return {rule["ID"]: rule for rule in s3.get_bucket_lifecycle_configuration(Bucket=ARTIFACTS)["Rules"]}


def test_the_artifacts_bucket_is_created_with_rules_expiring_regression_checkpoints_traces_and_dead_uploads(s3) -> None:
    assert artifacts_bucket("aws_default") == ARTIFACTS
    found = rules(s3)
    regression = {"Tag": {"Key": "dtp:kind", "Value": "regression-checkpoint"}}
    assert found["dtp:expire-regression-checkpoints"]["Filter"] == regression
    assert found["dtp:expire-regression-checkpoints"]["Expiration"] == {"Days": 30}
    # A person's run's checkpoint ("checkpoint") is what the run was for: no rule expires it.
    assert [rule for rule in found.values() if rule["Filter"].get("Tag", {}).get("Value") == "checkpoint"] == []
    assert found["dtp:expire-traces"]["Filter"] == {"Tag": {"Key": "dtp:kind", "Value": "trace"}}
    assert found["dtp:abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    assert sorted(found) == sorted(rule["ID"] for rule in LIFECYCLE_RULES)


def test_a_bucket_made_before_the_rules_gets_them_and_keeps_its_owners(s3) -> None:
    s3.create_bucket(Bucket=ARTIFACTS)  # DTP's, from before the rules: no lifecycle configuration
    assert artifacts_bucket("aws_default") == ARTIFACTS
    assert sorted(rules(s3)) == sorted(rule["ID"] for rule in LIFECYCLE_RULES)
    # The owner adds a rule of theirs beside DTP's, and an earlier DTP kept checkpoints longer under a rule it has
    # since dropped.
    stale = {**LIFECYCLE_RULES[0], "ID": "dtp:expire-old-checkpoints", "Expiration": {"Days": 90}}
    configuration = {"Rules": [OWNERS_RULE, stale, *LIFECYCLE_RULES[1:]]}
    s3.put_bucket_lifecycle_configuration(Bucket=ARTIFACTS, LifecycleConfiguration=configuration)
    assert artifacts_bucket("aws_default") == ARTIFACTS
    found = rules(s3)
    assert found.pop("archive-reports") == OWNERS_RULE
    assert sorted(found) == sorted(rule["ID"] for rule in LIFECYCLE_RULES)


def test_rules_already_there_are_not_written_again(s3, monkeypatch) -> None:
    s3.create_bucket(Bucket=ARTIFACTS)
    hook = S3Hook(aws_conn_id="aws_default")
    assert ensure_lifecycle(hook, ARTIFACTS) is True
    assert ensure_lifecycle(hook, ARTIFACTS) is False
    # A later DTP that keeps checkpoints longer writes its rules again.
    longer = {**LIFECYCLE_RULES[0], "Expiration": {"Days": 60}}
    monkeypatch.setattr(retention, "LIFECYCLE_RULES", [longer, *LIFECYCLE_RULES[1:]])
    assert ensure_lifecycle(hook, ARTIFACTS) is True
    assert rules(s3)["dtp:expire-regression-checkpoints"]["Expiration"] == {"Days": 60}


def test_profile_traces_carry_the_trace_tag(s3, tmp_path: Path) -> None:
    bucket = artifacts_bucket("aws_default")
    (tmp_path / "rank0.trace.json").write_text("{}")
    (tmp_path / "rank0.nsys-rep").write_bytes(b"\x00")
    spec = {"names": {"run_key": "dtp-run-0123456789"}}
    profile = upload_profile(spec, {}, str(tmp_path), S3Hook(aws_conn_id="aws_default"), bucket)
    assert profile["traces"] == [f"s3://{bucket}/runs/dtp-run-0123456789/profile/rank0.trace.json"]
    key = "runs/dtp-run-0123456789/profile/rank0.trace.json"
    assert s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"] == [{"Key": "dtp:kind", "Value": "trace"}]


def _access_denied(operation: str) -> ClientError:
    return ClientError({"Error": {"Code": "AccessDenied", "Message": "not authorized"}}, operation)


def refuse(
    client: Any, event: str, code: str, when: Callable[[dict[str, Any]], bool] = lambda request: True
) -> list[str]:
    """Have S3 answer the client's requests of ``event`` (``before-call.s3.<operation>``, or ``before-call.s3`` for
    every operation) that ``when(request)`` picks with the error ``code``, as S3 answers (moto enforces no IAM
    policy); the operations refused, as they are."""
    refused: list[str] = []

    def answer(model: Any, params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if not when(params):
            return None
        refused.append(model.name)
        status = 403 if code == "AccessDenied" else 400
        error = {"Error": {"Code": code, "Message": "refused"}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return AWSResponse("https://s3.amazonaws.com", status, {}, None), error

    client.meta.events.register(event, answer)
    return refused


def tagged(request: dict[str, Any]) -> bool:
    """Whether the request tags what it creates: S3 refuses it whole to a worker without s3:PutObjectTagging."""
    return "x-amz-tagging" in {name.lower() for name in request["headers"]}


def test_an_owners_rule_s3_will_not_merge_with_is_kept_and_s3s_reason_logged(s3, caplog) -> None:
    """S3 refuses a configuration mixing an owner's rule of the old form (``Prefix`` beside ``ID``, no ``Filter``) with
    DTP's: that is S3's reason, not the worker's policy, and the owner's configuration stays."""
    s3.create_bucket(Bucket=ARTIFACTS)
    old_form = {"ID": "expire-scratch", "Prefix": "scratch/", "Status": "Enabled", "Expiration": {"Days": 7}}
    s3.put_bucket_lifecycle_configuration(Bucket=ARTIFACTS, LifecycleConfiguration={"Rules": [old_form]})
    hook = S3Hook(aws_conn_id="aws_default")
    refused = refuse(hook.conn, "before-call.s3.PutBucketLifecycleConfiguration", "MalformedXML")
    with caplog.at_level(logging.WARNING, logger=retention.__name__):
        assert ensure_lifecycle(hook, ARTIFACTS) is False
    assert refused == ["PutBucketLifecycleConfiguration"]
    assert list(rules(s3)) == ["expire-scratch"]
    assert "MalformedXML" in caplog.text and retention.NOT_ALLOWED not in caplog.text


def test_a_worker_not_allowed_the_lifecycle_rules_warns_and_goes_on(s3, monkeypatch, caplog) -> None:
    """A worker whose policy predates the rules still creates and uses the bucket: retention never fails a run."""

    def denied(s3: S3Hook, bucket: str) -> bool:
        raise _access_denied("GetBucketLifecycleConfiguration")

    monkeypatch.setattr(retention, "_ensure_lifecycle", denied)
    with caplog.at_level(logging.WARNING, logger=retention.__name__):
        assert artifacts_bucket("aws_default") == ARTIFACTS
    assert "AccessDenied" in caplog.text and "s3:*LifecycleConfiguration" in caplog.text


def test_uploads_a_worker_may_not_tag_go_untagged_with_a_warning(monkeypatch, caplog) -> None:
    sent: list[dict[str, Any]] = []

    def load_string(self: S3Hook, *args: Any, **kwargs: Any) -> None:
        if "Tagging" in self.extra_args:  # PutObject allowed, its tagging not: S3 refuses the whole upload
            raise _access_denied("PutObject")
        sent.append(self.extra_args)

    monkeypatch.setattr(S3Hook, "load_string", load_string)
    hook = retention.tagged_uploads("aws_default", retention.TRACE)
    with caplog.at_level(logging.WARNING, logger=retention.__name__):
        hook.load_string("{}", "runs/r/profile/x.json", "bucket")
        hook.load_string("{}", "runs/r/profile/y.json", "bucket")
    assert sent == [{}, {}] and caplog.text.count("Uploading without the dtp:kind tag") == 1


@pytest.mark.parametrize(("size", "operation"), [(3, "PutObject"), (9 * MIB, "CreateMultipartUpload")])
def test_files_a_worker_may_not_tag_are_uploaded_untagged_with_a_warning(
    s3, tmp_path: Path, caplog, size: int, operation: str
) -> None:
    """A checkpoint's files go through boto3's file transfer (``load_file``), which raises S3UploadFailedError over
    S3's AccessDenied; past its 8 MiB threshold the refused request is CreateMultipartUpload."""
    s3.create_bucket(Bucket=ARTIFACTS)
    hook = retention.tagged_uploads("aws_default", retention.REGRESSION_CHECKPOINT)
    refused = refuse(hook.conn, "before-call.s3", "AccessDenied", tagged)
    shard = tmp_path / "shard.distcp"
    shard.write_bytes(b"\x01" * size)
    key = "runs/dtp-run-0123456789/checkpoints/step_100/shard.distcp"
    with caplog.at_level(logging.WARNING, logger=retention.__name__):
        hook.load_file(str(shard), key, ARTIFACTS, replace=True)
    assert refused == [operation]
    assert s3.head_object(Bucket=ARTIFACTS, Key=key)["ContentLength"] == size
    assert s3.get_object_tagging(Bucket=ARTIFACTS, Key=key)["TagSet"] == []
    assert "Uploading without the dtp:kind tag" in caplog.text and "AccessDenied" in caplog.text


def test_a_file_the_worker_may_not_write_at_all_still_fails_its_upload(s3, tmp_path: Path) -> None:
    s3.create_bucket(Bucket=ARTIFACTS)
    hook = retention.tagged_uploads("aws_default", retention.REGRESSION_CHECKPOINT)
    refused = refuse(hook.conn, "before-call.s3.PutObject", "AccessDenied")
    (tmp_path / "shard.distcp").write_bytes(b"\x01")
    with pytest.raises(S3UploadFailedError, match="AccessDenied"):
        hook.load_file(str(tmp_path / "shard.distcp"), "runs/r/checkpoints/shard.distcp", ARTIFACTS, replace=True)
    assert refused == ["PutObject", "PutObject"]  # tagged, then untagged: refused both ways
    assert "Contents" not in s3.list_objects_v2(Bucket=ARTIFACTS)


def test_a_refusal_other_than_tagging_still_fails_the_upload(monkeypatch) -> None:
    def load_string(self: S3Hook, *args: Any, **kwargs: Any) -> None:
        raise _access_denied("PutObject")  # not allowed to write there at all

    monkeypatch.setattr(S3Hook, "load_string", load_string)
    with pytest.raises(ClientError, match="AccessDenied"):
        retention.tagged_uploads("aws_default", retention.TRACE).load_string("{}", "k", "bucket")


@pytest.mark.parametrize(
    ("dag_id", "run_type", "kind"),
    [
        ("train_e2e", "manual", "checkpoint"),
        ("train_e2e", "asset_triggered", "checkpoint"),
        ("regression__llama3_1_70b", "manual", "regression-checkpoint"),  # most sizes have no schedule
        ("regression__tiny", "scheduled", "regression-checkpoint"),
    ],
)
def test_a_regression_dags_checkpoint_expires_however_its_run_started(dag_id: str, run_type: str, kind: str) -> None:
    spec = {"dag_id": dag_id, "run_type": run_type, "run_id": f"{run_type}__2026-12-07T10:00:00+00:00"}
    assert retention.checkpoint_kind(spec) == kind
