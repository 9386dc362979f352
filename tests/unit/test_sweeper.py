"""RunResourceSweeper against NAT gateways that AWS deletes asynchronously.

On AWS a NAT gateway is "deleting" for a minute or more after DeleteNatGateway: until it is "deleted" its Elastic
IP cannot be released (InvalidIPAddress.InUse), and its subnet and the internet gateway's attachment cannot go
(DependencyViolation). The local emulator (moto) deletes a NAT gateway at once ("deleted") and releases an
associated address without complaint, so it cannot show the order; botocore's Stubber answers as EC2 does, and
answers a call made out of order with an error. Tagged and leaked addresses against the emulator are in
tests/integration/test_network_stack.py.
"""

from __future__ import annotations

import pytest
from botocore.stub import Stubber

from dtp.hooks.sweeper import NatGatewaysNotDeleted, RunResourceSweeper

RUN = "dtp-train-e2e-0123456789"
NAT, IGW, VPC, SUBNET = "nat-0123456789abcdef0", "igw-0123456789abcdef0", "vpc-0123456789abcdef0", "subnet-0123456789"
ALLOC = "eipalloc-0123456789abcdef0"
TAGS = [{"Key": "dtp:run", "Value": RUN}]
BY_TAG = {"Filters": [{"Name": "tag:dtp:run", "Values": [RUN]}]}


@pytest.fixture
def sweeper(offline_aws: None) -> RunResourceSweeper:
    return RunResourceSweeper(aws_conn_id=None, region_name="us-east-1")


@pytest.fixture
def stub(sweeper: RunResourceSweeper):
    client = sweeper.get_client_type(region_name="us-east-1")
    sweeper.conn = client  # the hook's cached client, answered by the Stubber
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def _nat(state: str, tags: list[dict] = TAGS) -> dict:
    address = {"AllocationId": ALLOC, "PublicIp": "203.0.113.7", "AssociationId": "eipassoc-0123456789abcdef0"}
    return {"NatGatewayId": NAT, "State": state, "VpcId": VPC, "NatGatewayAddresses": [address], "Tags": tags}


def _expect_find(stub: Stubber, nat_state: str | None, tagged_addresses: list[dict] = ()) -> None:
    """What ``sweep`` reads first: the run's NAT gateways, then the rest of ``find`` (an internet gateway, a subnet
    and the VPC)."""
    stub.add_response("describe_nat_gateways", {"NatGateways": [_nat(nat_state)] if nat_state else []}, BY_TAG)
    stub.add_response("describe_addresses", {"Addresses": list(tagged_addresses)}, BY_TAG)
    stub.add_response("describe_internet_gateways", {"InternetGateways": [{"InternetGatewayId": IGW}]}, BY_TAG)
    stub.add_response("describe_subnets", {"Subnets": [{"SubnetId": SUBNET}]}, BY_TAG)
    stub.add_response("describe_route_tables", {"RouteTables": []}, BY_TAG)
    stub.add_response("describe_security_groups", {"SecurityGroups": []}, BY_TAG)
    stub.add_response("describe_vpcs", {"Vpcs": [{"VpcId": VPC}]}, BY_TAG)


def _expect_nat_deleted_then_the_rest(stub: Stubber, polls_deleting: int) -> None:
    for _ in range(polls_deleting):
        stub.add_response("describe_nat_gateways", {"NatGateways": [_nat("deleting")]}, {"NatGatewayIds": [NAT]})
    stub.add_response("describe_nat_gateways", {"NatGateways": [_nat("deleted")]}, {"NatGatewayIds": [NAT]})
    stub.add_response("release_address", {}, {"AllocationId": ALLOC})
    attached = {"InternetGatewayId": IGW, "Attachments": [{"VpcId": VPC, "State": "available"}]}
    stub.add_response("describe_internet_gateways", {"InternetGateways": [attached]}, {"InternetGatewayIds": [IGW]})
    stub.add_response("detach_internet_gateway", {}, {"InternetGatewayId": IGW, "VpcId": VPC})
    stub.add_response("delete_internet_gateway", {}, {"InternetGatewayId": IGW})
    stub.add_response("delete_subnet", {}, {"SubnetId": SUBNET})
    stub.add_response("delete_vpc", {}, {"VpcId": VPC})


def test_the_address_is_released_once_the_nat_gateway_is_deleted(sweeper, stub: Stubber) -> None:
    """Releasing straight after DeleteNatGateway fails with InvalidIPAddress.InUse on AWS: the sweep waits."""
    _expect_find(stub, "available")
    stub.add_response("delete_nat_gateway", {"NatGatewayId": NAT}, {"NatGatewayId": NAT})
    _expect_nat_deleted_then_the_rest(stub, polls_deleting=2)
    swept = sweeper.sweep(RUN, nat_delay=0)
    assert swept["nat_gateways"] == [NAT] and swept["addresses"] == [ALLOC]


def test_a_retry_releases_the_address_of_a_nat_gateway_still_deleting(sweeper, stub: Stubber) -> None:
    """The try before deleted the NAT gateway and stopped: the retry waits for it and releases its address."""
    _expect_find(stub, "deleting")
    _expect_nat_deleted_then_the_rest(stub, polls_deleting=1)
    assert sweeper.sweep(RUN, nat_delay=0)["addresses"] == [ALLOC]


def test_an_address_is_found_by_its_tag_once_its_nat_gateway_is_gone(sweeper, stub: Stubber) -> None:
    stub.add_response("describe_nat_gateways", {"NatGateways": []}, BY_TAG)
    tagged = {"AllocationId": ALLOC, "PublicIp": "203.0.113.7", "Domain": "vpc", "Tags": TAGS}
    stub.add_response("describe_addresses", {"Addresses": [tagged]}, BY_TAG)
    assert sweeper.addresses(RUN) == [ALLOC]


def test_a_nat_gateway_that_is_not_deleted_stops_the_sweep_before_its_dependents(sweeper, stub: Stubber) -> None:
    _expect_find(stub, "available")
    stub.add_response("delete_nat_gateway", {"NatGatewayId": NAT}, {"NatGatewayId": NAT})
    for _ in range(3):
        stub.add_response("describe_nat_gateways", {"NatGateways": [_nat("deleting")]}, {"NatGatewayIds": [NAT]})
    with pytest.raises(NatGatewaysNotDeleted, match=rf"NAT gateways {NAT} still not deleted after 0s"):
        sweeper.sweep(RUN, nat_delay=0, nat_attempts=3)  # nothing else is called: the Stubber would refuse it


def test_another_runs_nat_gateway_is_not_the_runs(sweeper, stub: Stubber) -> None:
    """The local emulator ignores the tag filter on NAT gateways: the tag is checked on what comes back."""
    other = _nat("available", tags=[{"Key": "dtp:run", "Value": "dtp-other-run"}])
    stub.add_response("describe_nat_gateways", {"NatGateways": [other, _nat("failed")]}, BY_TAG)
    assert sweeper.nat_gateways(RUN) == []
