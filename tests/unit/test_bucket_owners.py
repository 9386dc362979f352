"""Buckets DTP finds by name are used only when this account owns them: the artifacts bucket, HyperPod's lifecycle
bucket and the MWAA source bucket. A bucket name is global, so another account may create one of those names first
and open it to everyone; DTP would then write its checkpoints, reports and lifecycle scripts there and read them back.
Nor do teardown and the reaper delete a run's lifecycle objects from a bucket of that name another account made since.

moto (the local emulator) answers HeadBucket without looking at ExpectedBucketOwner; ``s3_checks_owners`` makes it
answer as S3 does, 403 when the bucket's owner is another account."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.stub import Stubber
from hyperpod_support import SETTINGS, spec_for
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.exceptions import MissingBucket
from moto.s3.responses import S3Response

from dtp.deploy.mwaa import package, upload
from dtp.pipeline.results import artifacts_bucket, owned_bucket_exists
from dtp.platforms import hyperpod_lifecycle
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.hyperpod import HyperPodPlatform
from dtp.reaper.deletion import reap
from dtp.reaper.expired import Expired

OTHER_ACCOUNT = "111122223333"
ARTIFACTS = f"dtp-artifacts-{DEFAULT_ACCOUNT_ID}-us-east-1"
NETWORK = {
    "SecurityGroup": "sg-0123456789abcdef0",
    "PrivateSubnet": "subnet-0123456789abcdef0",
    "FallbackPrivateSubnet": "subnet-0fedcba9876543210",
}


@pytest.fixture
def s3_checks_owners(moto_aws: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's S3 (a client of this account, moto's default), answering HeadBucket with ExpectedBucketOwner as S3
    does: 403 for a bucket another account owns."""
    head_bucket = S3Response.head_bucket

    def checked_head_bucket(self: S3Response) -> Any:
        expected = self.headers.get("x-amz-expected-bucket-owner")
        try:
            owner = self.backend.head_bucket(self.bucket_name).account_id
        except MissingBucket:
            owner = None
        if expected and owner and owner != expected:
            return 403, {}, ""
        return head_bucket(self)

    monkeypatch.setattr(S3Response, "head_bucket", checked_head_bucket)
    return moto_aws("s3")


def create_elsewhere(s3: Any, monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    """Create ``bucket`` in another account, readable and writable by this one (moto allows cross-account
    access), as someone who took the name first would."""
    with monkeypatch.context() as other:
        other.setenv("MOTO_ACCOUNT_ID", OTHER_ACCOUNT)
        s3.create_bucket(Bucket=bucket)


def test_the_emulator_passes_this_accounts_own_bucket_with_its_expected_owner(moto_aws) -> None:
    moto_aws("s3").create_bucket(Bucket="dtp-own")
    hook = S3Hook(aws_conn_id="aws_default")
    assert owned_bucket_exists(hook, "dtp-own", hook.account_id) is True
    assert owned_bucket_exists(hook, "dtp-absent", hook.account_id) is False


def test_a_bucket_another_account_owns_is_refused_naming_it(offline_aws) -> None:
    hook = S3Hook(aws_conn_id=None, region_name="us-east-1")
    with Stubber(hook.conn) as stub:
        expected = {"Bucket": "dtp-taken", "ExpectedBucketOwner": DEFAULT_ACCOUNT_ID}
        stub.add_client_error("head_bucket", "403", "Forbidden", 403, expected_params=expected)
        with pytest.raises(PermissionError, match="bucket dtp-taken exists but another AWS account owns it"):
            owned_bucket_exists(hook, "dtp-taken", DEFAULT_ACCOUNT_ID)


def test_the_artifacts_bucket_is_created_and_then_found_as_this_accounts(s3_checks_owners) -> None:
    assert artifacts_bucket("aws_default") == ARTIFACTS
    assert artifacts_bucket("aws_default") == ARTIFACTS
    assert [b["Name"] for b in s3_checks_owners.list_buckets()["Buckets"]] == [ARTIFACTS]


def test_an_artifacts_bucket_another_account_created_first_is_refused(s3_checks_owners, monkeypatch) -> None:
    create_elsewhere(s3_checks_owners, monkeypatch, ARTIFACTS)
    with pytest.raises(PermissionError, match=f"bucket {ARTIFACTS} exists but another AWS account owns it"):
        artifacts_bucket("aws_default")


def test_hyperpod_refuses_a_lifecycle_bucket_another_account_owns_before_creating_the_cluster(
    settings, s3_checks_owners, monkeypatch
) -> None:
    create_elsewhere(s3_checks_owners, monkeypatch, "sagemaker-dtp-lifecycle")
    with pytest.raises(PlatformNotReady, match="'dtp_hyperpod' extra: lifecycle_bucket: bucket sagemaker-dtp-lifecy"):
        HyperPodPlatform().provision(spec_for(), NETWORK)
    assert "Contents" not in s3_checks_owners.list_objects_v2(Bucket="sagemaker-dtp-lifecycle")


def lifecycle_bucket_taken_since(s3: Any, monkeypatch: pytest.MonkeyPatch, run_key: str) -> list[str]:
    """The lifecycle bucket, deleted since the run began and its name taken by another account, holding objects under
    the run's prefix that are that account's; their keys."""
    create_elsewhere(s3, monkeypatch, SETTINGS["lifecycle_bucket"])
    keys = [f"{run_key}/lifecycle/on_create.sh", f"{run_key}/lifecycle/provisioning_parameters.json"]
    for key in keys:
        s3.put_object(Bucket=SETTINGS["lifecycle_bucket"], Key=key, Body=b"#")
    return keys


def stored(s3: Any) -> list[str]:
    return [obj["Key"] for obj in s3.list_objects_v2(Bucket=SETTINGS["lifecycle_bucket"]).get("Contents", [])]


def test_teardown_deletes_nothing_in_a_lifecycle_bucket_another_account_owns(
    settings, s3_checks_owners, monkeypatch, caplog
) -> None:
    spec = spec_for()
    keys = lifecycle_bucket_taken_since(s3_checks_owners, monkeypatch, spec["names"]["run_key"])
    with caplog.at_level(logging.WARNING, logger=hyperpod_lifecycle.__name__):
        done = HyperPodPlatform().start_teardown(spec)
    assert done["deleted_lifecycle_objects"] == 0
    assert stored(s3_checks_owners) == keys
    assert "another AWS account owns it" in caplog.text


def test_the_reaper_deletes_nothing_in_a_lifecycle_bucket_another_account_owns(
    moto_aws, s3_checks_owners, monkeypatch, caplog
) -> None:
    """The reaper reads the bucket from the cluster's description: a name the cluster was created with, long ago."""
    run_key = "dtp-train-e2e-0123456789"
    keys = lifecycle_bucket_taken_since(s3_checks_owners, monkeypatch, run_key)
    group = {
        "InstanceGroupName": "compute-nodes",
        "InstanceType": "ml.m5.2xlarge",
        "InstanceCount": 1,
        "LifeCycleConfig": {
            "SourceS3Uri": f"s3://{SETTINGS['lifecycle_bucket']}/{run_key}/lifecycle/",
            "OnCreate": "on_create.sh",
        },
        "ExecutionRole": SETTINGS["execution_role_arn"],
        "ThreadsPerCore": 1,
    }
    sagemaker = moto_aws("sagemaker")
    sagemaker.create_cluster(ClusterName=run_key, InstanceGroups=[group], Tags=[{"Key": "dtp:run", "Value": run_key}])
    found = [Expired("hyperpod_cluster", run_key, run_key, "2026-12-01T00:00:00Z")]
    with caplog.at_level(logging.WARNING, logger=hyperpod_lifecycle.__name__):
        assert [d["name"] for d in reap(found, "aws_default", None, dry_run=False)["deleted"]] == [run_key]
    assert sagemaker.list_clusters()["ClusterSummaries"] == []
    assert stored(s3_checks_owners) == keys
    assert "another AWS account owns it" in caplog.text


def test_mwaa_refuses_a_source_bucket_another_account_owns(s3_checks_owners, monkeypatch, tmp_path: Path) -> None:
    create_elsewhere(s3_checks_owners, monkeypatch, "dtp-mwaa-source")
    with pytest.raises(PermissionError, match="bucket dtp-mwaa-source exists but another AWS account owns it"):
        upload(package(tmp_path / "out", "3.1.7"), "dtp-mwaa-source", "aws_default")
    assert "Contents" not in s3_checks_owners.list_objects_v2(Bucket="dtp-mwaa-source")
