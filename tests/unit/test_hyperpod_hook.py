"""HyperPodHook's delete and tag listing where SageMaker is not in the state the caller last saw: a cluster already
being deleted (a retried teardown, the reaper after an earlier try) and one deleted between ListClusters and ListTags
(the reaper's search). botocore's Stubber answers as SageMaker does: every request is validated against the real
service model, every canned answer against its output shapes (the emulator deletes a cluster at once: it is never
Deleting)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from dtp.hooks.hyperpod import HyperPodHook

NAME = "dtp-train-e2e-0123456789"
OTHER = "dtp-train-e2e-9876543210"
ARN = "arn:aws:sagemaker:us-east-1:123456789012:cluster/{}"
CREATED = datetime(2026, 12, 5, tzinfo=UTC)
GROUP = {
    "CurrentCount": 1,
    "TargetCount": 1,
    "InstanceGroupName": "compute-nodes",
    "InstanceType": "ml.p5.48xlarge",
    "LifeCycleConfig": {"SourceS3Uri": "s3://sagemaker-dtp-lifecycle/lifecycle/", "OnCreate": "on_create.sh"},
    "ExecutionRole": "arn:aws:iam::123456789012:role/hyperpod-execution",
    "ThreadsPerCore": 1,
}
NOT_FOUND = ("ResourceNotFound", f"Cluster {NAME} not found")
CONFLICT = ("ConflictException", f"Cluster {NAME} is in Deleting state")


@pytest.fixture
def hook(offline_aws: None) -> HyperPodHook:
    return HyperPodHook(aws_conn_id=None, region_name="us-east-1")


def _described(status: str, name: str = NAME) -> dict:
    return {
        "ClusterArn": ARN.format(name),
        "ClusterName": name,
        "ClusterStatus": status,
        "CreationTime": CREATED,
        "InstanceGroups": [GROUP],
    }


def _describe(stub: Stubber, status: str | None, name: str = NAME) -> None:
    if status is None:
        stub.add_client_error("describe_cluster", *NOT_FOUND, expected_params={"ClusterName": name})
    else:
        stub.add_response("describe_cluster", _described(status, name), {"ClusterName": name})


def test_a_cluster_already_deleting_is_waited_for_not_deleted_again(hook: HyperPodHook, stub: Stubber) -> None:
    """A retried teardown meets the cluster its first try started deleting: SageMaker may refuse a second
    DeleteCluster with ConflictException, which would fail the task instead of waiting."""
    for status in ("Deleting", "Deleting", "Deleting", None):
        _describe(stub, status)
    assert hook.delete_cluster_and_wait(NAME, poll=0) is True


def test_a_cluster_in_service_is_deleted_and_waited_for(hook: HyperPodHook, stub: Stubber) -> None:
    _describe(stub, "InService")
    stub.add_response("delete_cluster", {"ClusterArn": ARN.format(NAME)}, {"ClusterName": NAME})
    for status in ("Deleting", None):
        _describe(stub, status)
    assert hook.delete_cluster_and_wait(NAME, poll=0) is True


def test_a_missing_cluster_is_not_deleted(hook: HyperPodHook, stub: Stubber) -> None:
    _describe(stub, None)  # delete_cluster asks first
    _describe(stub, None)  # and the wait finds nothing
    assert hook.delete_cluster_and_wait(NAME, poll=0) is False


def test_a_cluster_gone_between_describe_and_delete_is_not_deleted(hook: HyperPodHook, stub: Stubber) -> None:
    _describe(stub, "Failed")
    stub.add_client_error("delete_cluster", *NOT_FOUND, expected_params={"ClusterName": NAME})
    _describe(stub, None)
    assert hook.delete_cluster_and_wait(NAME, poll=0) is False


def test_a_conflict_on_a_cluster_not_deleting_is_raised(hook: HyperPodHook, stub: Stubber) -> None:
    _describe(stub, "Updating")
    stub.add_client_error("delete_cluster", *CONFLICT, expected_params={"ClusterName": NAME})
    with pytest.raises(ClientError, match="ConflictException"):
        hook.delete_cluster(NAME)


def _listed(stub: Stubber, *names: str) -> None:
    summaries = [
        {"ClusterArn": ARN.format(n), "ClusterName": n, "CreationTime": CREATED, "ClusterStatus": "InService"}
        for n in names
    ]
    stub.add_response("list_clusters", {"ClusterSummaries": summaries}, {})


def test_a_cluster_deleted_after_it_was_listed_is_skipped(hook: HyperPodHook, stub: Stubber) -> None:
    _listed(stub, NAME, OTHER)
    stub.add_client_error("list_tags", *NOT_FOUND, expected_params={"ResourceArn": ARN.format(NAME)})
    tags = [{"Key": "dtp:run", "Value": OTHER}]
    stub.add_response("list_tags", {"Tags": tags}, {"ResourceArn": ARN.format(OTHER)})
    assert hook.tagged_clusters() == [(OTHER, {"dtp:run": OTHER})]


def test_a_list_tags_error_of_a_cluster_described_gone_is_skipped(hook: HyperPodHook, stub: Stubber) -> None:
    """SageMaker may answer ListTags of a deleted resource with ValidationException; DescribeCluster decides."""
    _listed(stub, NAME)
    stub.add_client_error(
        "list_tags", "ValidationException", "Resource does not exist", expected_params={"ResourceArn": ARN.format(NAME)}
    )
    _describe(stub, None)
    assert hook.tagged_clusters() == []


def test_a_list_tags_error_of_a_cluster_still_there_fails_the_search(hook: HyperPodHook, stub: Stubber) -> None:
    """Its tags unread, an expired cluster would be left unseen: the search fails, as before."""
    _listed(stub, NAME)
    stub.add_client_error(
        "list_tags", "AccessDeniedException", "not authorized", expected_params={"ResourceArn": ARN.format(NAME)}
    )
    _describe(stub, "InService")
    with pytest.raises(ClientError, match="AccessDeniedException"):
        hook.tagged_clusters()
