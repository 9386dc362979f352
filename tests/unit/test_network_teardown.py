"""dtp.pipeline.network's teardown without the emulator: a stack whose deletion failed is deleted again once the
sweep removed what blocked it, and whatever of the run's outlives the teardown is reported as leaked."""

from __future__ import annotations

import re
from typing import Any

import pytest
from botocore.stub import Stubber

from dtp.hooks.stacks import StackHook
from dtp.naming import RunNames
from dtp.pipeline import network

NAMES = RunNames("train_e2e", "manual__2026-01-01T00:00:00+00:00")
BUCKET = NAMES.data_bucket


# --- teardown: DELETE_FAILED, the sweep, and the final leak check ---------------------------------------------------
# CloudFormation is answered by a Stubber (moto never reports DELETE_FAILED); EC2 and S3, which the sweep deletes
# from and its final check looks in, are moto's, in this process.
STACK = NAMES.network_stack
STACK_ID = f"arn:aws:cloudformation:us-east-1:123456789012:stack/{STACK}/11111111-2222-3333-4444-555555555555"
BLOCKED = "The vpc 'vpc-1' has dependencies and cannot be deleted. (Service: Ec2, Status Code: 400)"


def _stack(status: str) -> dict[str, Any]:
    return {"Stacks": [{"StackId": STACK_ID, "StackName": STACK, "CreationTime": "2026-01-01T00:00:00Z",
                        "StackStatus": status}]}  # fmt: skip


def _delete(cloudformation: Stubber, before: str, after: str) -> None:
    """One delete_and_wait: the stack as found, the DeleteStack, the stack as it ended."""
    cloudformation.add_response("describe_stacks", _stack(before), {"StackName": STACK})
    cloudformation.add_response("delete_stack", {}, {"StackName": STACK_ID})
    cloudformation.add_response("describe_stacks", _stack(after), {"StackName": STACK_ID})


def _failure_events(cloudformation: Stubber) -> None:
    event = {"StackId": STACK_ID, "EventId": "e-1", "StackName": STACK, "Timestamp": "2026-01-01T00:05:00Z",
             "LogicalResourceId": "VPC", "ResourceStatus": "DELETE_FAILED",
             "ResourceStatusReason": BLOCKED}  # fmt: skip
    cloudformation.add_response("describe_stack_events", {"StackEvents": [event]}, {"StackName": STACK})


@pytest.fixture
def cloudformation(moto_aws, monkeypatch: pytest.MonkeyPatch):
    """The StackHook destroy_run_resources makes, its CloudFormation client answered by a Stubber."""
    hook = StackHook(aws_conn_id="aws_default")
    hook.conn = hook.get_client_type(region_name="us-east-1")
    monkeypatch.setattr(network, "StackHook", lambda **kwargs: hook)
    with Stubber(hook.conn) as stub:
        yield stub
        stub.assert_no_pending_responses()


def _run_tags() -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": [{"Key": "dtp:run", "Value": NAMES.run_key}]}
            for kind in ("vpc", "security-group")]  # fmt: skip


def _blocked_vpc(moto_aws) -> tuple[str, str]:
    """The run's VPC (the stack's, left by its failed delete) and, in it, a security group of the run's that the stack
    did not make (a cluster's): what blocks the VPC's deletion."""
    ec2 = moto_aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", TagSpecifications=_run_tags()[:1])["Vpc"]["VpcId"]
    group = ec2.create_security_group(
        GroupName="cluster", Description="nodes", VpcId=vpc, TagSpecifications=_run_tags()[1:]
    )["GroupId"]
    return vpc, group


def test_a_delete_failed_stack_is_deleted_again_once_the_sweep_removed_its_blocker(
    cloudformation: Stubber, moto_aws, caplog: pytest.LogCaptureFixture
) -> None:
    vpc, group = _blocked_vpc(moto_aws)
    s3 = moto_aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="checkpoints/x", Body=b"non-empty bucket")
    ec2 = moto_aws("ec2")
    run_filter = [{"Name": "tag:dtp:run", "Values": [NAMES.run_key]}]
    groups_at_delete: list[list[str]] = []  # the run's security groups, as each DeleteStack is sent

    def record(**kwargs: Any) -> None:
        groups = ec2.describe_security_groups(Filters=run_filter)["SecurityGroups"]
        groups_at_delete.append([g["GroupId"] for g in groups])

    cloudformation.client.meta.events.register("before-parameter-build.cloudformation.DeleteStack", record)
    _delete(cloudformation, "CREATE_COMPLETE", "DELETE_FAILED")
    _failure_events(cloudformation)
    _delete(cloudformation, "DELETE_FAILED", "DELETE_COMPLETE")
    cloudformation.add_client_error(
        "describe_stacks",
        "ValidationError",
        f"Stack with id {STACK} does not exist",
        expected_params={"StackName": STACK},
    )

    result = network.destroy_run_resources("aws_default", NAMES.run_key, [STACK], (BUCKET,))

    assert groups_at_delete == [[group], []]  # deleted again only after the sweep removed the blocking group
    assert result == {
        "objects_deleted": 1,
        "stack_status": {STACK: "DELETE_COMPLETE"},
        "swept": {"security_groups": [group], "vpcs": [vpc], "buckets": [BUCKET]},
    }
    assert ec2.describe_vpcs(Filters=run_filter)["Vpcs"] == []
    assert s3.list_buckets()["Buckets"] == []
    assert f"Stack {STACK}: DELETE_FAILED (VPC: {BLOCKED}); sweeping what blocks it" in caplog.text


def test_a_stack_still_delete_failed_after_the_sweep_is_reported_as_leaked(cloudformation: Stubber) -> None:
    """The second delete fails too (what blocks it is no resource of the run's): teardown must not succeed."""
    _delete(cloudformation, "CREATE_COMPLETE", "DELETE_FAILED")
    _failure_events(cloudformation)
    _delete(cloudformation, "DELETE_FAILED", "DELETE_FAILED")
    cloudformation.add_response("describe_stacks", _stack("DELETE_FAILED"), {"StackName": STACK})
    leaked = f"resources of run {NAMES.run_key} still exist after deletion: {{'stacks': ['{STACK} (DELETE_FAILED)']}}"
    with pytest.raises(network.LeakedResources, match=re.escape(leaked)):
        network.destroy_run_resources("aws_default", NAMES.run_key, [STACK], ())


def test_a_resource_of_the_run_the_sweep_leaves_is_reported_as_leaked(moto_aws) -> None:
    """The sweep leaves a VPC's main route table to the VPC's deletion; one that carries the run's tag in a VPC that
    is not the run's outlives the sweep, and the final check finds it. (CloudFormation is moto's: no stack left.)"""
    ec2 = moto_aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]["RouteTableId"]
    ec2.create_tags(Resources=[main], Tags=[{"Key": "dtp:run", "Value": NAMES.run_key}])
    leaked = f"resources of run {NAMES.run_key} still exist after deletion: {{'route_tables': ['{main}']}}"
    with pytest.raises(network.LeakedResources, match=re.escape(leaked)):
        network.destroy_run_resources("aws_default", NAMES.run_key, [STACK], ())
    assert ec2.describe_route_tables(RouteTableIds=[main])["RouteTables"]  # it was found, not deleted
