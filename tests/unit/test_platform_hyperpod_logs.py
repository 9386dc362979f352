"""A HyperPod cluster's CloudWatch log group expires once DTP is done with the cluster, against moto's CloudWatch Logs
(SageMaker answered by a Stubber): teardown and provision's deletion of a cluster that failed for capacity give it
ParallelCluster's retention, and neither fails for it (the reaper's deletion: test_reaper_hyperpod.py)."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook
from botocore.awsrequest import AWSResponse
from botocore.stub import Stubber
from hyperpod_support import SETTINGS, spec_for, stub_teardown

from dtp.hooks.hyperpod import HyperPodHook
from dtp.platforms import hyperpod as hyperpod_platform
from dtp.platforms import hyperpod_logs
from dtp.platforms.capacity import placements
from dtp.platforms.hyperpod import HyperPodPlatform

NETWORK = {
    "SecurityGroup": "sg-0123456789abcdef0",
    "PrivateSubnet": "subnet-0123456789abcdef0",
    "FallbackPrivateSubnet": "subnet-0fedcba9876543210",
}
# A cluster's id, the last part of its ARN, as SageMaker makes them.
CLUSTER_ID = "a1b2c3d4e5f6"
CLUSTER_ARN = f"arn:aws:sagemaker:us-east-1:111122223333:cluster/{CLUSTER_ID}"


@pytest.fixture
def hook(moto_aws: Any, monkeypatch: pytest.MonkeyPatch) -> HyperPodHook:
    """The SageMaker hook the platform makes, whose client the ``stub`` fixture answers (S3 is moto's)."""
    hook = HyperPodHook(aws_conn_id="aws_default")
    monkeypatch.setattr(hyperpod_platform, "HyperPodHook", lambda **_: hook)
    return hook


@pytest.fixture
def logs(moto_aws: Any, monkeypatch: pytest.MonkeyPatch) -> AwsLogsHook:
    """The CloudWatch Logs hook the platform makes (moto's), whose client a test may have refuse calls."""
    hook = AwsLogsHook(aws_conn_id="aws_default")
    monkeypatch.setattr(hyperpod_logs, "AwsLogsHook", lambda **_: hook)
    return hook


@pytest.fixture
def spec(moto_aws: Any) -> dict[str, Any]:
    """A run's spec, its lifecycle bucket there (empty)."""
    moto_aws("s3").create_bucket(Bucket=SETTINGS["lifecycle_bucket"])
    return spec_for()


def retention(logs: AwsLogsHook, group: str) -> int | None:
    """The days the log group ``group`` keeps its events; None: for ever."""
    (found,) = [g for g in logs.conn.describe_log_groups()["logGroups"] if g["logGroupName"] == group]
    days: int | None = found.get("retentionInDays")
    return days


def deny(logs: AwsLogsHook, operation: str) -> list[str]:
    """Have CloudWatch Logs refuse the hook's ``operation`` calls with AccessDeniedException, as it answers a worker
    whose policy lacks the action (moto enforces no IAM policy); the operations refused."""
    refused: list[str] = []

    def answer(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        refused.append(model.name)
        error = {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}}
        return AWSResponse("https://logs.us-east-1.amazonaws.com", 400, {}, None), error

    logs.conn.meta.events.register(f"before-call.logs.{operation}", answer)
    return refused


@pytest.mark.parametrize("status", ["InService", "Deleting"])
def test_teardown_has_the_clusters_log_group_expire(
    settings, spec, stub: Stubber, logs: AwsLogsHook, status: str
) -> None:
    name = spec["names"]["run_key"]
    # As SageMaker leaves them: no retention. Another cluster's group is not this teardown's to change.
    group, other = f"/aws/sagemaker/Clusters/{name}/{CLUSTER_ID}", f"/aws/sagemaker/Clusters/{name}-2/0123456789ab"
    for created in (group, other):
        logs.conn.create_log_group(logGroupName=created)
    stub_teardown(stub, name, status, CLUSTER_ARN)
    done = HyperPodPlatform().start_teardown(spec)
    assert done == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 0}
    # Kept for a post-mortem, as a ParallelCluster's, then expired (a retried teardown puts the same retention).
    assert (retention(logs, group), retention(logs, other)) == (14, None)


def test_a_cluster_with_no_log_group_is_torn_down(settings, spec, stub: Stubber, logs: AwsLogsHook, caplog) -> None:
    """A cluster whose nodes never logged (never created, failed early) has no log group: nothing to expire."""
    name = spec["names"]["run_key"]
    stub_teardown(stub, name, arn=CLUSTER_ARN)
    with caplog.at_level("INFO", logger=hyperpod_logs.__name__):
        done = HyperPodPlatform().start_teardown(spec)
    assert done == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 0}
    assert f"no log group /aws/sagemaker/Clusters/{name}/{CLUSTER_ID}" in caplog.text
    assert logs.conn.describe_log_groups()["logGroups"] == []


def test_a_worker_not_allowed_to_expire_the_log_group_still_tears_the_cluster_down(
    settings, spec, stub: Stubber, logs: AwsLogsHook, caplog
) -> None:
    """A worker policy from before logs:PutRetentionPolicy: the group keeps its events, the teardown goes on."""
    group = f"/aws/sagemaker/Clusters/{spec['names']['run_key']}/{CLUSTER_ID}"
    logs.conn.create_log_group(logGroupName=group)
    refused = deny(logs, "PutRetentionPolicy")
    stub_teardown(stub, spec["names"]["run_key"], arn=CLUSTER_ARN)
    done = HyperPodPlatform().start_teardown(spec)
    assert done == {"cancelled_jobs": [], "deleted_cluster": True, "deleted_lifecycle_objects": 0}
    assert refused == ["PutRetentionPolicy"] and retention(logs, group) is None
    (warning,) = [r for r in caplog.records if r.name == hyperpod_logs.__name__ and r.levelname == "WARNING"]
    assert "lacks logs:PutRetentionPolicy" in warning.getMessage() and group in warning.getMessage()


def test_a_cluster_that_failed_for_capacity_is_deleted_with_its_log_group_expiring(
    settings, stub: Stubber, logs: AwsLogsHook
) -> None:
    """provision deletes the cluster an earlier try left Failed for capacity before it creates another: the log group
    its nodes that did start wrote to expires as a torn-down cluster's does."""
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    name = spec["names"]["run_key"]
    last = placements(spec, "hyperpod", NETWORK, {})[-1]  # it failed there: no placement is left to try
    compute = {"InstanceGroupName": "compute-nodes", "InstanceType": f"ml.{last.instance_type}"}
    if last.subnet != NETWORK["PrivateSubnet"]:
        compute["OverrideVpcConfig"] = {"SecurityGroupIds": [NETWORK["SecurityGroup"]], "Subnets": [last.subnet]}
    failed = {
        "ClusterArn": CLUSTER_ARN,
        "ClusterName": name,
        "ClusterStatus": "Failed",
        "FailureMessage": "InsufficientInstanceCapacity",
        "InstanceGroups": [compute],
        "VpcConfig": {"SecurityGroupIds": [NETWORK["SecurityGroup"]], "Subnets": [NETWORK["PrivateSubnet"]]},
    }
    group = f"/aws/sagemaker/Clusters/{name}/{CLUSTER_ID}"
    logs.conn.create_log_group(logGroupName=group)
    stub.add_response("describe_cluster", failed, {"ClusterName": name})
    stub.add_response("describe_cluster", failed, {"ClusterName": name})  # delete_cluster's own look
    stub.add_response("delete_cluster", {"ClusterArn": CLUSTER_ARN}, {"ClusterName": name})
    stub.add_client_error("describe_cluster", "ResourceNotFound", expected_params={"ClusterName": name})  # gone
    with pytest.raises(RuntimeError, match=r"^no capacity for 4 nodes in any placement"):
        HyperPodPlatform().provision(spec, NETWORK)
    assert retention(logs, group) == 14
