"""RunResourceSweeper against NAT gateways that AWS deletes asynchronously, and against a bucket with system tags.

On AWS a NAT gateway is "deleting" for a minute or more after DeleteNatGateway: until it is "deleted" its Elastic
IP cannot be released (InvalidIPAddress.InUse), and its subnet and the internet gateway's attachment cannot go
(DependencyViolation). The local emulator (moto) deletes a NAT gateway at once ("deleted") and releases an
associated address without complaint, so it cannot show the order; botocore's Stubber answers as EC2 does, and
answers a call made out of order with an error. Tagged and leaked addresses against the emulator are in
tests/integration/test_network_stack.py.
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from dtp.hooks.sweeper import BucketTaggingFailed, NatGatewaysNotDeleted, RunResourceSweeper

RUN = "dtp-train-e2e-0123456789"
NAT, IGW, VPC, SUBNET = "nat-0123456789abcdef0", "igw-0123456789abcdef0", "vpc-0123456789abcdef0", "subnet-0123456789"
VPCE = "vpce-0123456789abcdef0"
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
    endpoints = [{"VpcEndpointId": VPCE, "State": "available"}, {"VpcEndpointId": "vpce-0gone", "State": "deleted"}]
    stub.add_response("describe_vpc_endpoints", {"VpcEndpoints": endpoints}, BY_TAG)
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
    # The S3 gateway endpoint, before its VPC (one already deleted is not asked for again).
    stub.add_response("delete_vpc_endpoints", {"Unsuccessful": []}, {"VpcEndpointIds": [VPCE]})
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


# --- the run's tags on its bucket -----------------------------------------------------------------------------------
# On AWS, CloudFormation puts system tags on a bucket it creates; S3 refuses a PutBucketTagging that drops them
# ("InvalidTag: System Tags cannot be removed by requester") or names one. The emulator (moto) puts none, so only a
# Stubber, which answers a call nobody expected with an error, shows that no PutBucketTagging is sent.
BUCKET = "dtp-train-e2e-0123456789-data"
RUN_TAGS = {"dtp:run": RUN, "dtp:expires-at": "2026-01-01T00:00:00Z", "dtp:owner": "dtp"}
SYSTEM_TAGS = {
    "aws:cloudformation:stack-name": "dtp-train-e2e-0123456789-network",
    "aws:cloudformation:stack-id": "arn:aws:cloudformation:us-east-1:123456789012:stack/dtp-net/0123",
    "aws:cloudformation:logical-id": "DataBucket",
}


def _tag_set(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


@pytest.fixture
def s3_stub(sweeper: RunResourceSweeper):
    client = sweeper.s3.get_client_type(region_name="us-east-1")
    sweeper.s3.conn = client  # the S3 hook's cached client, answered by the Stubber
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def tagging_stub(sweeper: RunResourceSweeper):
    with Stubber(sweeper.tagging) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def _expect_tags(s3_stub: Stubber, tags: dict[str, str] | None) -> None:
    if tags is None:
        s3_stub.add_client_error(
            "get_bucket_tagging", "NoSuchTagSet", "The TagSet does not exist", 404, expected_params={"Bucket": BUCKET}
        )
    else:
        s3_stub.add_response("get_bucket_tagging", {"TagSet": _tag_set(tags)}, {"Bucket": BUCKET})


def test_a_bucket_with_the_stacks_tags_already_is_left_alone(sweeper, s3_stub: Stubber, tagging_stub) -> None:
    """AWS propagates the stack's tags (the run's) to the bucket, next to its system tags: nothing is written."""
    _expect_tags(s3_stub, {**SYSTEM_TAGS, **RUN_TAGS})
    assert sweeper.tag_bucket(BUCKET, RUN_TAGS) == "present"


def test_a_bucket_with_system_tags_is_tagged_through_the_tagging_api(
    sweeper, s3_stub: Stubber, tagging_stub: Stubber
) -> None:
    """A PutBucketTagging would drop the system tags (refused) or name them (refused too): the Resource Groups
    Tagging API adds the missing tags and keeps the others."""
    _expect_tags(s3_stub, {**SYSTEM_TAGS, "dtp:run": RUN})
    missing = {k: v for k, v in RUN_TAGS.items() if k != "dtp:run"}
    tagging_stub.add_response(
        "tag_resources", {"FailedResourcesMap": {}}, {"ResourceARNList": [f"arn:aws:s3:::{BUCKET}"], "Tags": missing}
    )
    assert sweeper.tag_bucket(BUCKET, RUN_TAGS) == "tagging-api"


def test_a_tagging_api_failure_is_raised(sweeper, s3_stub: Stubber, tagging_stub: Stubber) -> None:
    """TagResources reports a resource it could not tag in its answer, not as an error."""
    _expect_tags(s3_stub, SYSTEM_TAGS)
    arn = f"arn:aws:s3:::{BUCKET}"
    failure = {arn: {"StatusCode": 403, "ErrorCode": "InvalidParameterException", "ErrorMessage": "denied"}}
    tagging_stub.add_response(
        "tag_resources", {"FailedResourcesMap": failure}, {"ResourceARNList": [arn], "Tags": RUN_TAGS}
    )
    with pytest.raises(BucketTaggingFailed, match=f"could not tag bucket {BUCKET}.*denied"):
        sweeper.tag_bucket(BUCKET, RUN_TAGS)


def test_an_untagged_bucket_gets_the_runs_tags(sweeper, s3_stub: Stubber, tagging_stub) -> None:
    _expect_tags(s3_stub, None)  # NoSuchTagSet: no tags at all
    s3_stub.add_response(
        "put_bucket_tagging",
        {},
        {"Bucket": BUCKET, "Tagging": {"TagSet": [{"Key": k, "Value": RUN_TAGS[k]} for k in sorted(RUN_TAGS)]}},
    )
    assert sweeper.tag_bucket(BUCKET, RUN_TAGS) == "put"


def test_a_put_keeps_the_buckets_other_tags(sweeper, s3_stub: Stubber, tagging_stub) -> None:
    """Without system tags the whole set is put: the bucket's own tags with the run's, a changed value replaced."""
    _expect_tags(s3_stub, {"team": "ml", "dtp:expires-at": "2025-01-01T00:00:00Z"})
    merged = {"team": "ml", **RUN_TAGS}
    s3_stub.add_response(
        "put_bucket_tagging",
        {},
        {"Bucket": BUCKET, "Tagging": {"TagSet": [{"Key": k, "Value": merged[k]} for k in sorted(merged)]}},
    )
    assert sweeper.tag_bucket(BUCKET, RUN_TAGS) == "put"


def test_other_errors_reading_the_tags_are_raised(sweeper, s3_stub: Stubber, tagging_stub) -> None:
    s3_stub.add_client_error("get_bucket_tagging", "AccessDenied", "Access Denied", 403)
    with pytest.raises(ClientError, match="AccessDenied"):
        sweeper.tag_bucket(BUCKET, RUN_TAGS)
