"""The run's network stack against the local emulator: idempotent create, outputs, verified teardown."""

from __future__ import annotations

import uuid

import pytest

from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.naming import RunNames, expiry, resource_tags
from dtp.pipeline import network

pytestmark = pytest.mark.stack
AWS = "aws_default"


@pytest.fixture
def spec(stack) -> dict:
    names = RunNames("it_network", f"manual__{uuid.uuid4().hex}")
    return {
        "params": {"keep_cluster": False},
        "names": names.as_dict(),
        "tags": resource_tags(names, "tiny", expiry(1)),
    }


def _stacks_named(aws, name: str) -> list[dict]:
    live = aws("cloudformation").list_stacks()["StackSummaries"]
    return [s for s in live if s["StackName"] == name and s["StackStatus"] != "DELETE_COMPLETE"]


def test_create_twice_makes_one_stack_and_teardown_leaves_nothing(spec, aws) -> None:
    run_key = spec["names"]["run_key"]
    network.create_network_stack(spec, AWS)
    network.create_network_stack(spec, AWS)
    assert len(_stacks_named(aws, spec["names"]["network_stack"])) == 1
    ec2 = aws("ec2")
    assert len(ec2.describe_vpcs(Filters=[{"Name": "tag:dtp:run", "Values": [run_key]}])["Vpcs"]) == 1

    outputs = network.network_outputs(spec, AWS)
    assert set(outputs) == {
        "VPC",
        "PublicSubnet",
        "PrivateSubnet",
        "FallbackPrivateSubnet",
        "SecurityGroup",
        "FSXSecurityGroup",
        "DataBucket",
    }
    subnets = ec2.describe_subnets(SubnetIds=[outputs["PrivateSubnet"], outputs["FallbackPrivateSubnet"]])["Subnets"]
    zones = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets}
    assert [zones[outputs["PrivateSubnet"]], zones[outputs["FallbackPrivateSubnet"]]] == network.availability_zones(
        AWS
    )[:2]
    s3 = aws("s3")
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=outputs["DataBucket"])["TagSet"]}
    assert tags["dtp:run"] == run_key and "dtp:expires-at" in tags
    s3.put_object(Bucket=outputs["DataBucket"], Key="checkpoints/x", Body=b"non-empty bucket")

    result = network.teardown_network(spec, AWS)
    assert result["objects_deleted"] == 1
    assert RunResourceSweeper(aws_conn_id=AWS).find(run_key, (outputs["DataBucket"],)) == {
        "nat_gateways": [],
        "internet_gateways": [],
        "subnets": [],
        "route_tables": [],
        "security_groups": [],
        "vpcs": [],
        "buckets": [],
    }
    assert _stacks_named(aws, spec["names"]["network_stack"]) == []
    # A retried teardown finds nothing to do and still succeeds.
    assert network.teardown_network(spec, AWS)["stack_status"] == {spec["names"]["network_stack"]: "DELETE_COMPLETE"}


def test_keep_cluster_keeps_the_stack(spec, aws) -> None:
    network.create_network_stack(spec, AWS)
    kept = {**spec, "params": {"keep_cluster": True}}
    assert network.teardown_network(kept, AWS) == {"kept": True}
    assert len(_stacks_named(aws, spec["names"]["network_stack"])) == 1
    network.teardown_network(spec, AWS)
    assert _stacks_named(aws, spec["names"]["network_stack"]) == []


def test_half_created_stack_is_reused_and_torn_down(spec, aws) -> None:
    """A create that broke part-way (the emulator leaves it CREATE_IN_PROGRESS) is found again, not duplicated,
    and teardown still removes it and what it made."""
    hook = StackHook(aws_conn_id=AWS)
    name = spec["names"]["network_stack"]
    broken = (
        "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n"
        "  V:\n    Type: AWS::EC2::VPC\n    Properties: {CidrBlock: 10.0.0.0/16}\n"
        "  S:\n    Type: AWS::EC2::Subnet\n    Properties: {VpcId: !Ref V, CidrBlock: 10.9.0.0/24}\n"
    )
    with pytest.raises(Exception, match=r"InvalidSubnet\.Range"):
        hook.ensure_stack(name, broken, {}, spec["tags"])
    network.create_network_stack(spec, AWS)
    assert len(_stacks_named(aws, name)) == 1
    network.teardown_network(spec, AWS)
    assert _stacks_named(aws, name) == []
    vpcs = aws("ec2").describe_vpcs(Filters=[{"Name": "tag:dtp:run", "Values": [spec["names"]["run_key"]]}])["Vpcs"]
    assert vpcs == []
