"""The artifacts bucket's lifecycle rules, against moto's S3: a bucket DTP creates gets them, one it made before them
gets them on its next use, and the rules of the bucket's owner stay as they are; profile traces carry the tag the
rules expire them by, and the run's metrics do not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
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
