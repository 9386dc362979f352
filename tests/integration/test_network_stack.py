"""The run's network stack against the local emulator: idempotent create, outputs, verified teardown; subnets in
zones that offer the run's instance type, S3 through a gateway endpoint; the stack of a platform that needs no
network (EKS): the bucket alone."""

from __future__ import annotations

import uuid

import pytest
from airflow.providers.amazon.aws.sensors.cloud_formation import CloudFormationCreateStackSensor
from airflow.sdk.exceptions import AirflowFailException
from botocore.exceptions import ClientError

from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.naming import RunNames, expiry, resource_tags
from dtp.pipeline import network
from dtp.sensors.stacks import StackCreatedSensor

pytestmark = pytest.mark.stack
AWS = "aws_default"
VPC_TEMPLATE = (
    "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n"
    "  V:\n    Type: AWS::EC2::VPC\n    Properties: {CidrBlock: 10.0.0.0/16}\n"
)
# A create that fails part-way: the emulator fails the CreateStack call and leaves the stack CREATE_IN_PROGRESS.
BROKEN_TEMPLATE = (
    "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n"
    "  V:\n    Type: AWS::EC2::VPC\n    Properties: {CidrBlock: 10.0.0.0/16}\n"
    "  S:\n    Type: AWS::EC2::Subnet\n    Properties: {VpcId: !Ref V, CidrBlock: 10.9.0.0/24}\n"
)


@pytest.fixture
def spec(stack) -> dict:
    names = RunNames("it_network", f"manual__{uuid.uuid4().hex}")
    return {
        "params": {"keep_cluster": False, "platform": "batch", "instance_type": "m5.2xlarge"},
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
    assert (zones[outputs["PrivateSubnet"]], zones[outputs["FallbackPrivateSubnet"]]) == network.subnet_zones(spec, AWS)
    s3 = aws("s3")
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=outputs["DataBucket"])["TagSet"]}
    assert tags["dtp:run"] == run_key and "dtp:expires-at" in tags
    s3.put_object(Bucket=outputs["DataBucket"], Key="checkpoints/x", Body=b"non-empty bucket")

    result = network.teardown_network(spec, AWS)
    assert result["objects_deleted"] == 1
    assert RunResourceSweeper(aws_conn_id=AWS).find(run_key, (outputs["DataBucket"],)) == {
        "nat_gateways": [],
        "addresses": [],
        "internet_gateways": [],
        "vpc_endpoints": [],
        "subnets": [],
        "route_tables": [],
        "security_groups": [],
        "vpcs": [],
        "buckets": [],
    }
    assert _stacks_named(aws, spec["names"]["network_stack"]) == []
    # A retried teardown finds nothing to do and still succeeds.
    assert network.teardown_network(spec, AWS)["stack_status"] == {spec["names"]["network_stack"]: "DELETE_COMPLETE"}


def test_the_subnets_are_in_zones_offering_the_type_and_s3_skips_the_nat_gateway(spec, aws) -> None:
    """The emulator offers p4de.24xlarge in us-east-1b and c only (not in a, the region's first zone); the private
    route table sends S3 traffic to the gateway endpoint. (The emulator makes no placement groups: the template's
    is checked in tests/unit/test_network.py.)"""
    spec = {**spec, "params": {**spec["params"], "instance_type": "p4de.24xlarge"}}
    network.plan_network_stack(spec, AWS)
    network.create_network_stack(spec, AWS)
    try:
        outputs = network.network_outputs(spec, AWS)
        ec2 = aws("ec2")
        subnets = ec2.describe_subnets(SubnetIds=[outputs["PrivateSubnet"], outputs["FallbackPrivateSubnet"]])
        zones = {s["SubnetId"]: s["AvailabilityZone"] for s in subnets["Subnets"]}
        assert zones == {outputs["PrivateSubnet"]: "us-east-1b", outputs["FallbackPrivateSubnet"]: "us-east-1c"}
        # The private route table: the one whose default route goes to the NAT gateway (the emulator lists no
        # subnet associations of a stack's route tables).
        vpc = [{"Name": "vpc-id", "Values": [outputs["VPC"]]}]
        private = [
            table["RouteTableId"]
            for table in ec2.describe_route_tables(Filters=vpc)["RouteTables"]
            if any("NatGatewayId" in route for route in table["Routes"])
        ]
        endpoints = ec2.describe_vpc_endpoints(Filters=vpc)["VpcEndpoints"]
        assert [(e["VpcEndpointType"], e["ServiceName"], e["RouteTableIds"]) for e in endpoints] == [
            ("Gateway", "com.amazonaws.us-east-1.s3", private)
        ]
    finally:
        network.teardown_network(spec, AWS)


def _bucket_tags(aws, bucket: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in aws("s3").get_bucket_tagging(Bucket=bucket)["TagSet"]}


def test_the_run_tags_are_added_to_the_buckets_own(spec, aws) -> None:
    """The run's tags are added to the bucket's tags, not put in their place; a second read writes nothing new.
    (The emulator puts no system tags on the bucket: the Stubbers of tests/unit/test_network.py show those.)"""
    network.create_network_stack(spec, AWS)
    try:
        bucket = spec["names"]["data_bucket"]
        aws("s3").put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "team", "Value": "ml"}]})
        network.network_outputs(spec, AWS)
        assert _bucket_tags(aws, bucket) == {"team": "ml", **spec["tags"]}
        network.network_outputs(spec, AWS)
        assert _bucket_tags(aws, bucket) == {"team": "ml", **spec["tags"]}
    finally:
        network.teardown_network(spec, AWS)


def test_an_eks_run_gets_only_the_bucket_and_its_teardown_leaves_nothing(spec, aws) -> None:
    """EKS runs on its cluster's own VPC: the run's stack holds the bucket (what dtp.pipeline.data reads) and no
    VPC, subnet, NAT gateway or Elastic IP; teardown and its sweep handle a stack without them."""
    spec = {**spec, "params": {**spec["params"], "platform": "eks"}}
    run_key, name, bucket = (spec["names"][k] for k in ("run_key", "network_stack", "data_bucket"))
    sweeper = RunResourceSweeper(aws_conn_id=AWS)
    network.create_network_stack(spec, AWS)
    try:
        network.create_network_stack(spec, AWS)
        assert len(_stacks_named(aws, name)) == 1
        parameters = aws("cloudformation").describe_stacks(StackName=name)["Stacks"][0]["Parameters"]
        assert {"ParameterKey": "CreateNetwork", "ParameterValue": "false"} in parameters
        # (The emulator lists each resource its condition left out as an entry without a logical id.)
        resources = aws("cloudformation").describe_stack_resources(StackName=name)["StackResources"]
        created = [(r["LogicalResourceId"], r["ResourceType"]) for r in resources if "LogicalResourceId" in r]
        assert created == [("DataBucket", "AWS::S3::Bucket")]

        outputs = network.network_outputs(spec, AWS)
        assert outputs == {"DataBucket": bucket}
        tags = _bucket_tags(aws, bucket)
        assert tags["dtp:run"] == run_key and "dtp:expires-at" in tags
        # The emulator puts the stack's tags (the run's) on EC2 resources it creates: none was created.
        assert {kind: ids for kind, ids in sweeper.find(run_key, (bucket,)).items() if ids} == {"buckets": [bucket]}
        aws("s3").put_object(Bucket=bucket, Key="checkpoints/x", Body=b"non-empty bucket")
    finally:
        result = network.teardown_network(spec, AWS)
    assert result["objects_deleted"] == 1 and result["stack_status"] == {name: "DELETE_COMPLETE"}
    assert not any(sweeper.find(run_key, (bucket,)).values())
    assert _stacks_named(aws, name) == []


def test_a_run_in_an_existing_vpc_gets_only_the_bucket_and_leaves_the_vpc_alone(spec, aws) -> None:
    """With the dtp_network connection the run's cluster goes into that VPC: the run's stack holds the bucket, the
    outputs name the VPC's subnets and security group, and teardown deletes the bucket only."""
    ec2 = aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="efa", Description="EFA", VpcId=vpc)["GroupId"]
    existing = {"VPC": vpc, "PrivateSubnet": subnet, "PublicSubnet": subnet, "SecurityGroup": group}
    spec = {**spec, "existing_network": existing}
    name, bucket = spec["names"]["network_stack"], spec["names"]["data_bucket"]
    try:
        network.create_network_stack(spec, AWS)
        resources = aws("cloudformation").describe_stack_resources(StackName=name)["StackResources"]
        assert [r["LogicalResourceId"] for r in resources if "LogicalResourceId" in r] == ["DataBucket"]
        assert network.network_outputs(spec, AWS) == {**existing, "DataBucket": bucket}
    finally:
        network.teardown_network(spec, AWS)
        assert _stacks_named(aws, name) == []
        assert ec2.describe_subnets(SubnetIds=[subnet])["Subnets"] and ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"]
        ec2.delete_security_group(GroupId=group)
        ec2.delete_subnet(SubnetId=subnet)
        ec2.delete_vpc(VpcId=vpc)


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
    with pytest.raises(ClientError, match=r"InvalidSubnet\.Range"):
        hook.ensure_stack(name, BROKEN_TEMPLATE, {}, spec["tags"])
    network.create_network_stack(spec, AWS)
    assert len(_stacks_named(aws, name)) == 1
    network.teardown_network(spec, AWS)
    assert _stacks_named(aws, name) == []
    vpcs = aws("ec2").describe_vpcs(Filters=[{"Name": "tag:dtp:run", "Values": [spec["names"]["run_key"]]}])["Vpcs"]
    assert vpcs == []


def _nat_of(aws, run_key: str) -> dict:
    """The run's NAT gateway (the emulator ignores tag filters on NAT gateways: the tag is checked here)."""
    nats = [
        n
        for n in aws("ec2").describe_nat_gateways()["NatGateways"]
        if {"Key": "dtp:run", "Value": run_key} in n.get("Tags", []) and n["State"] != "deleted"
    ]
    assert len(nats) == 1, nats
    return nats[0]


def _allocated(aws, allocation_id: str) -> bool:
    try:
        aws("ec2").describe_addresses(AllocationIds=[allocation_id])
    except ClientError as err:
        assert err.response["Error"]["Code"] == "InvalidAllocationID.NotFound"
        return False
    return True


def test_a_leaked_elastic_ip_is_released_by_its_tag(spec, aws) -> None:
    """A sweep that stopped after deleting the NAT gateway (AWS: its address is in use until the NAT gateway is
    deleted) leaves an address no NAT gateway holds: the next teardown finds it by the run's tag and releases it."""
    run_key = spec["names"]["run_key"]
    network.create_network_stack(spec, AWS)
    parameters = aws("cloudformation").describe_stacks(StackName=spec["names"]["network_stack"])["Stacks"][0]
    # The template tags the Elastic IP with VPCName as dtp:run (the emulator drops template tags on addresses).
    assert {"ParameterKey": "VPCName", "ParameterValue": run_key} in parameters["Parameters"]
    network.network_outputs(spec, AWS)
    nat = _nat_of(aws, run_key)
    allocation_id = nat["NatGatewayAddresses"][0]["AllocationId"]
    tags = aws("ec2").describe_addresses(AllocationIds=[allocation_id])["Addresses"][0]["Tags"]
    assert {"Key": "dtp:run", "Value": run_key} in tags and any(t["Key"] == "dtp:expires-at" for t in tags)
    assert RunResourceSweeper(aws_conn_id=AWS).find(run_key)["addresses"] == [allocation_id]

    aws("ec2").delete_nat_gateway(NatGatewayId=nat["NatGatewayId"])  # the sweep that stopped here
    assert RunResourceSweeper(aws_conn_id=AWS).find(run_key)["nat_gateways"] == []
    result = network.teardown_network(spec, AWS)

    assert result["swept"]["addresses"] == [allocation_id]
    assert not _allocated(aws, allocation_id)
    assert RunResourceSweeper(aws_conn_id=AWS).find(run_key)["addresses"] == []


def test_a_teardown_leaves_other_runs_nat_gateways_alone(spec, aws) -> None:
    """The emulator answers a tag-filtered DescribeNatGateways with every NAT gateway: a sweep that trusted the
    filter deleted those of every other run (and released their addresses)."""
    names = RunNames("it_network", f"manual__{uuid.uuid4().hex}")
    other = {**spec, "names": names.as_dict(), "tags": resource_tags(names, "tiny", expiry(1))}
    network.create_network_stack(spec, AWS)
    network.create_network_stack(other, AWS)
    try:
        kept = _nat_of(aws, names.run_key)
        network.teardown_network(spec, AWS)
        assert _nat_of(aws, names.run_key)["State"] == "available"
        assert _allocated(aws, kept["NatGatewayAddresses"][0]["AllocationId"])
    finally:
        network.teardown_network(other, AWS)
    assert not _allocated(aws, kept["NatGatewayAddresses"][0]["AllocationId"])


def test_wait_for_stack_fails_at_once_on_a_stack_that_is_gone(spec, aws) -> None:
    """A stack deleted while it was awaited (as OnFailure=DELETE does) is reported, not poked for an hour."""
    name = spec["names"]["network_stack"]
    sensor = StackCreatedSensor(task_id="wait_for_stack", stack_name=name, aws_conn_id=AWS)
    network.create_network_stack(spec, AWS)
    assert sensor.poke({}) is True
    network.teardown_network(spec, AWS)
    assert CloudFormationCreateStackSensor(task_id="provider", stack_name=name, aws_conn_id=AWS).poke({}) is False
    with pytest.raises(AirflowFailException, match=rf"stack {name} does not exist \(deleted\?\)"):
        sensor.poke({})


def test_the_events_of_a_deleted_stack_are_read_by_its_id(spec, aws) -> None:
    """DescribeStackEvents by name fails once the stack is deleted; by the id of the newest deleted stack of that
    name it still answers. (The emulator records no failure events, and none of a network stack whose DeleteStack
    it refused, hence the plain VPC.)"""
    hook, name = StackHook(aws_conn_id=AWS), spec["names"]["network_stack"]
    hook.ensure_stack(name, VPC_TEMPLATE, {}, spec["tags"])
    assert hook.failure_reasons(name) == "no failure events"
    assert hook.delete_and_wait(name, poll=0) == "DELETE_COMPLETE"
    with pytest.raises(ClientError, match="does not exist"):
        aws("cloudformation").describe_stack_events(StackName=name)
    assert hook.failure_reasons(name) == "no failure events"  # read by id: no longer "no events"


def test_wait_for_stack_waits_on_a_half_created_stack(spec, aws) -> None:
    """The emulator leaves a create that broke part-way CREATE_IN_PROGRESS (it cannot roll back): still waited on."""
    hook = StackHook(aws_conn_id=AWS)
    name = spec["names"]["network_stack"]
    with pytest.raises(ClientError, match=r"InvalidSubnet\.Range"):
        hook.ensure_stack(name, BROKEN_TEMPLATE, {}, spec["tags"])
    try:
        assert StackCreatedSensor(task_id="wait_for_stack", stack_name=name, aws_conn_id=AWS).poke({}) is False
    finally:
        network.teardown_network(spec, AWS)
