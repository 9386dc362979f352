"""HyperPodClusterTrigger's events for a cluster that does not come up as it should: Failed or RollingBack (with
SageMaker's reason), still Creating at the deadline, InService without a node in its controller's group;
HyperPodClusterDeleteTrigger's for clusters being deleted, gone or still there at the deadline; and the triggers
rebuilt from what they serialized, as a restarted triggerer does. botocore's Stubber answers as SageMaker does
(the emulator creates a cluster InService at once, with every node): every request is validated against the real
service model, every canned answer against its output shapes. The InService and gone cluster against the emulator
are in tests/integration/test_hyperpod.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.stub import Stubber

import dtp.triggers.hyperpod as hyperpod_triggers
from dtp.hooks.hyperpod import HyperPodHook
from dtp.triggers.hyperpod import HyperPodClusterDeleteTrigger, HyperPodClusterTrigger

NAME = "dtp-train-e2e-0123456789"
EARLIER = "dtp-train-e2e-9876543210"  # an earlier incarnation's
CLUSTER_ID = "abcd1234efgh"
ARN = f"arn:aws:sagemaker:us-east-1:123456789012:cluster/{CLUSTER_ID}"
CONTROLLER = "controller-machine"
CREATED = datetime(2026, 12, 5, tzinfo=UTC)
CAPACITY = "We currently do not have sufficient capacity for ml.p5.48xlarge in the Availability Zone you requested."


@pytest.fixture
def hook(offline_aws: None, monkeypatch: pytest.MonkeyPatch) -> HyperPodHook:
    """The hook the trigger makes."""
    hook = HyperPodHook(aws_conn_id=None, region_name="us-east-1")
    monkeypatch.setattr(hyperpod_triggers, "HyperPodHook", lambda **_: hook)
    return hook


def _describe(stub: Stubber, status: str | None, name: str = NAME, **fields: Any) -> None:
    """DescribeCluster of ``name``, answering ``status``, or that no such cluster exists (None)."""
    if status is None:
        message = f"Cluster {name} not found"
        stub.add_client_error("describe_cluster", "ResourceNotFound", message, expected_params={"ClusterName": name})
        return
    described = {"ClusterArn": ARN, "ClusterName": name, "ClusterStatus": status, "CreationTime": CREATED,
                 "InstanceGroups": [], **fields}  # fmt: skip
    stub.add_response("describe_cluster", described, {"ClusterName": name})


def _nodes(stub: Stubber, *groups: str) -> None:
    """ListClusterNodes by the controller's group name, answering nodes of ``groups`` (matched by substring)."""
    summaries = [
        {
            "InstanceGroupName": group,
            "InstanceId": f"i-0{n:016x}",
            "InstanceType": "ml.m5.2xlarge",
            "LaunchTime": CREATED,
            "InstanceStatus": {"Status": "Running"},
        }
        for n, group in enumerate(groups)
    ]
    expected = {"ClusterName": NAME, "InstanceGroupNameContains": CONTROLLER}
    stub.add_response("list_cluster_nodes", {"ClusterNodeSummaries": summaries}, expected)


def _trigger(**options: Any) -> HyperPodClusterTrigger:
    return HyperPodClusterTrigger(NAME, aws_conn_id=None, poll_interval=0, **options)


def test_a_failed_cluster_fails_the_wait_with_sagemakers_reason(stub: Stubber, first_event) -> None:
    _describe(stub, "Creating")
    _describe(stub, "Failed", FailureMessage=CAPACITY)
    assert first_event(_trigger(controller_group=CONTROLLER)) == {
        "status": "failed",
        "message": f"HyperPod cluster {NAME} is Failed: {CAPACITY}",
    }  # and no controller is looked for (the Stubber would refuse a ListClusterNodes)


def test_a_cluster_rolling_back_without_a_reason_fails_the_wait(stub: Stubber, first_event) -> None:
    _describe(stub, "RollingBack")
    event = first_event(_trigger())
    assert event == {"status": "failed", "message": f"HyperPod cluster {NAME} is RollingBack: no failure message"}


def test_a_cluster_still_creating_at_the_deadline_fails_the_wait_after_a_triggerer_restart(
    stub: Stubber, first_event
) -> None:
    # The deadline is set when the task defers and survives a triggerer restart (the trigger is rebuilt from it).
    deferred = _trigger(timeout=3600, controller_group=CONTROLLER)
    deferred.started_at -= 3601  # the task deferred an hour ago
    classpath, kwargs = deferred.serialize()
    assert classpath == "dtp.triggers.hyperpod.HyperPodClusterTrigger"
    _describe(stub, "Creating")
    assert first_event(HyperPodClusterTrigger(**kwargs)) == {
        "status": "failed",
        "message": f"HyperPod cluster {NAME} is still Creating after 3600 s",
    }


def test_a_cluster_creating_within_its_deadline_is_waited_for(stub: Stubber, first_event) -> None:
    for status in ("Creating", "Creating", "InService"):
        _describe(stub, status)
    assert first_event(_trigger(timeout=3600)) == {
        "status": "success",
        "message": f"HyperPod cluster {NAME} is InService",
    }


def test_a_rebuilt_trigger_still_finds_the_controller(stub: Stubber, first_event) -> None:
    """The controller's group is serialized with the rest: the rebuilt trigger names the controller's SSM target
    (only a node of exactly that group: ListClusterNodes matches group names by substring)."""
    _, kwargs = _trigger(controller_group=CONTROLLER).serialize()
    _describe(stub, "InService")
    _nodes(stub, f"{CONTROLLER}-spare", CONTROLLER)
    event = first_event(HyperPodClusterTrigger(**kwargs))
    assert event == {
        "status": "success",
        "message": f"HyperPod cluster {NAME} is InService",
        "cluster": {"head_node": f"sagemaker-cluster:{CLUSTER_ID}_{CONTROLLER}-i-00000000000000001"},
    }


def test_a_cluster_in_service_without_a_controller_node_fails_the_wait(stub: Stubber, first_event) -> None:
    # Its jobs could reach no controller: deploy_cluster fails, naming why, rather than using the connection's host.
    _describe(stub, "InService")
    _nodes(stub, f"{CONTROLLER}-spare")
    assert first_event(_trigger(controller_group=CONTROLLER)) == {
        "status": "failed",
        "message": f"HyperPod cluster {NAME} is InService, but its {CONTROLLER} group has no node",
    }


def test_deleted_clusters_are_waited_for_until_every_one_is_gone(stub: Stubber, first_event, capsys) -> None:
    _describe(stub, "Deleting", NAME)
    _describe(stub, "Deleting", EARLIER)
    _describe(stub, "Deleting", NAME)
    _describe(stub, None, EARLIER)
    _describe(stub, None, NAME)  # and the gone EARLIER is not asked about again
    trigger = HyperPodClusterDeleteTrigger([NAME, EARLIER], aws_conn_id=None, poll_interval=0)
    assert first_event(trigger) == {"status": "success", "message": f"HyperPod clusters {NAME}, {EARLIER} are deleted"}
    logged = capsys.readouterr().out.splitlines()
    waits = [line.split("deleted: ", 1)[1].split(" [", 1)[0] for line in logged if "clusters are deleted: " in line]
    assert waits == [f"{NAME} (Deleting), {EARLIER} (Deleting)", f"{NAME} (Deleting)"]


def test_clusters_still_there_at_the_deadline_fail_the_wait_after_a_triggerer_restart(
    stub: Stubber, first_event
) -> None:
    deferred = HyperPodClusterDeleteTrigger([NAME, EARLIER], aws_conn_id=None, poll_interval=0)
    assert deferred.timeout == 1800  # as long as the synchronous teardown waits
    deferred.started_at -= 1801  # the task deferred half an hour ago
    classpath, kwargs = deferred.serialize()
    assert classpath == "dtp.triggers.hyperpod.HyperPodClusterDeleteTrigger"
    _describe(stub, "Deleting", NAME)
    _describe(stub, "Failed", EARLIER, FailureMessage="Network interface eni-0123 is in use")
    assert first_event(HyperPodClusterDeleteTrigger(**kwargs)) == {
        "status": "failed",
        "message": f"HyperPod clusters still there 1800 s after DeleteCluster: {NAME} is Deleting; "
        f"{EARLIER} is Failed: Network interface eni-0123 is in use",
    }
