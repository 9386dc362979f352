"""The reaper's deletion of a HyperPod cluster teardown left, against moto's SageMaker, S3 and CloudWatch Logs: the
run's lifecycle objects go with it, found in the bucket the cluster's own description names, and no other run's; its
log group is made to expire, as teardown does."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook
from botocore.awsrequest import AWSResponse

from dtp.platforms import hyperpod_logs
from dtp.reaper.deletion import reap
from dtp.reaper.expired import Expired

BUCKET = "sagemaker-dtp-lifecycle"
REAPED = "dtp-train-e2e-0123456789"
# Another run, whose key starts with the reaped one's.
OTHER = "dtp-train-e2e-01234567890"


def create_cluster(sagemaker: Any, run_key: str, bucket: str = BUCKET) -> None:
    """A cluster as HyperPodPlatform creates one: named by its run, its groups' scripts under the run's prefix."""
    group = {
        "InstanceGroupName": "compute-nodes",
        "InstanceType": "ml.m5.2xlarge",
        "InstanceCount": 1,
        "LifeCycleConfig": {"SourceS3Uri": f"s3://{bucket}/{run_key}/lifecycle/", "OnCreate": "on_create.sh"},
        "ExecutionRole": "arn:aws:iam::123456789012:role/dtp-hyperpod-execution",
        "ThreadsPerCore": 1,
    }
    tags = [{"Key": "dtp:run", "Value": run_key}, {"Key": "dtp:owner", "Value": "dtp"}]
    sagemaker.create_cluster(ClusterName=run_key, InstanceGroups=[group], Tags=tags)


def keys(s3: Any, bucket: str = BUCKET) -> list[str]:
    return [obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def lifecycle(moto_aws: Any) -> Any:
    """The lifecycle bucket, holding the scripts of the reaped run and of another; the S3 client."""
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    for run_key in (REAPED, OTHER):
        for name in ("on_create.sh", "provisioning_parameters.json"):
            s3.put_object(Bucket=BUCKET, Key=f"{run_key}/lifecycle/{name}", Body=b"#")
    return s3


def test_a_reaped_clusters_lifecycle_objects_go_with_it_and_no_other_runs(moto_aws, lifecycle) -> None:
    sagemaker = moto_aws("sagemaker")
    for run_key in (REAPED, OTHER):
        create_cluster(sagemaker, run_key)
    found = [Expired("hyperpod_cluster", REAPED, REAPED, "2026-12-01T00:00:00Z")]
    assert [d["name"] for d in reap(found, "aws_default", None, dry_run=False)["deleted"]] == [REAPED]
    assert [c["ClusterName"] for c in sagemaker.list_clusters()["ClusterSummaries"]] == [OTHER]
    assert keys(lifecycle) == [f"{OTHER}/lifecycle/on_create.sh", f"{OTHER}/lifecycle/provisioning_parameters.json"]


def test_the_bucket_is_the_one_the_cluster_was_created_with(moto_aws, lifecycle) -> None:
    """The dtp_hyperpod connection may name another lifecycle bucket since: the cluster's description says."""
    earlier = "sagemaker-dtp-lifecycle-earlier"
    lifecycle.create_bucket(Bucket=earlier)
    lifecycle.put_object(Bucket=earlier, Key=f"{REAPED}/lifecycle/on_create.sh", Body=b"#")
    create_cluster(moto_aws("sagemaker"), REAPED, bucket=earlier)
    reap([Expired("hyperpod_cluster", REAPED, REAPED, "2026-12-01T00:00:00Z")], "aws_default", None, dry_run=False)
    assert keys(lifecycle, earlier) == []
    assert len(keys(lifecycle)) == 4  # the bucket it was not created with keeps what it holds


def log_group(sagemaker: Any, run_key: str) -> str:
    """The log group SageMaker writes the cluster's node logs to: its name, then its id (the end of its ARN)."""
    cluster_id = sagemaker.describe_cluster(ClusterName=run_key)["ClusterArn"].rsplit("/", 1)[1]
    return f"/aws/sagemaker/Clusters/{run_key}/{cluster_id}"


def retention(logs: Any, group: str) -> int | None:
    """The days the log group ``group`` keeps its events; None: for ever."""
    (found,) = [g for g in logs.describe_log_groups()["logGroups"] if g["logGroupName"] == group]
    days: int | None = found.get("retentionInDays")
    return days


def test_a_reaped_clusters_log_group_expires_and_no_other_runs(moto_aws, lifecycle) -> None:
    sagemaker, logs = moto_aws("sagemaker"), moto_aws("logs")
    groups = {}
    for run_key in (REAPED, OTHER):
        create_cluster(sagemaker, run_key)
        groups[run_key] = log_group(sagemaker, run_key)
        logs.create_log_group(logGroupName=groups[run_key])  # as SageMaker makes it: no retention
    reap([Expired("hyperpod_cluster", REAPED, REAPED, "2026-12-01T00:00:00Z")], "aws_default", None, dry_run=False)
    assert (retention(logs, groups[REAPED]), retention(logs, groups[OTHER])) == (14, None)


def test_a_worker_not_allowed_to_expire_the_log_group_still_reaps_the_cluster(
    moto_aws, lifecycle, monkeypatch, caplog
) -> None:
    sagemaker = moto_aws("sagemaker")
    create_cluster(sagemaker, REAPED)
    group = log_group(sagemaker, REAPED)
    hook = AwsLogsHook(aws_conn_id="aws_default")
    hook.conn.create_log_group(logGroupName=group)
    monkeypatch.setattr(hyperpod_logs, "AwsLogsHook", lambda **_: hook)

    def refuse(**_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        # CloudWatch Logs' answer to a worker whose policy lacks the action (moto enforces no IAM policy).
        error = {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}
        return AWSResponse("https://logs.us-east-1.amazonaws.com", 400, {}, None), error

    hook.conn.meta.events.register("before-call.logs.PutRetentionPolicy", refuse)
    found = [Expired("hyperpod_cluster", REAPED, REAPED, "2026-12-01T00:00:00Z")]
    assert [d["name"] for d in reap(found, "aws_default", None, dry_run=False)["deleted"]] == [REAPED]
    assert sagemaker.list_clusters()["ClusterSummaries"] == []
    assert retention(hook.conn, group) is None
    assert f"{group} keeps its events: the worker's policy lacks logs:PutRetentionPolicy" in caplog.text
