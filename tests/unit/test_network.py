"""dtp.pipeline.network without the emulator: which stack a run's platform gets (the dtp_network connection's
existing VPC included), the zones of its subnets, and how the run's tags reach the stack's bucket (moto in this
process, and botocore Stubbers that answer as AWS does where moto does not; its teardown:
test_network_teardown.py; the emulator runs are in tests/integration/test_network_stack.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.sdk.exceptions import AirflowFailException
from botocore.stub import Stubber
from cfnlint.decode import decode_str

from dtp.form_params import ParamsError
from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.naming import RunNames, expiry, resource_tags
from dtp.pipeline import network
from dtp.pipeline.spec import build_spec
from dtp.platforms.base import PlatformNotReady

NAMES = RunNames("train_e2e", "manual__2026-01-01T00:00:00+00:00")
TAGS = resource_tags(NAMES, "tiny", expiry(1))
BUCKET = NAMES.data_bucket
SYSTEM_TAGS = [
    {"Key": "aws:cloudformation:stack-name", "Value": NAMES.network_stack},
    {"Key": "aws:cloudformation:stack-id", "Value": "arn:aws:cloudformation:us-east-1:123456789012:stack/x/0123"},
    {"Key": "aws:cloudformation:logical-id", "Value": "DataBucket"},
]


def _spec(platform: str, instance_type: str = "p5.48xlarge") -> dict[str, Any]:
    params = {"keep_cluster": False, "platform": platform, "instance_type": instance_type}
    return {"params": params, "names": NAMES.as_dict(), "tags": TAGS}


# --- which stack ----------------------------------------------------------------------------------------------------
@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The parameters of each ensure_stack call; the region has zones a and b, both offering every type, and no
    capacity is reserved."""
    calls: list[dict[str, str]] = []

    def ensure_stack(self, name: str, body: str, parameters: dict[str, str], tags: dict[str, str]) -> dict:
        assert name == NAMES.network_stack and tags == TAGS
        calls.append(parameters)
        return {}

    monkeypatch.setattr(StackHook, "ensure_stack", ensure_stack)
    monkeypatch.setattr(network, "availability_zones", lambda conn_id: ["us-east-1a", "us-east-1b"])
    monkeypatch.setattr(network, "zones_offering", lambda conn_id, instance_type: {"us-east-1a", "us-east-1b"})
    monkeypatch.setattr(network, "reserved_zone", lambda spec, conn_id: "")
    return calls


def test_an_eks_run_gets_a_stack_with_only_the_bucket(created, monkeypatch: pytest.MonkeyPatch) -> None:
    """EKS runs on its cluster's VPC: no VPC, NAT gateway or Elastic IP of the run's, and no zones are looked up."""

    def no_zones(conn_id: str) -> list[str]:
        raise AssertionError("a bucket-only stack needs no availability zones")

    monkeypatch.setattr(network, "availability_zones", no_zones)
    assert not network.needs_network(_spec("eks"))
    assert network.create_network_stack(_spec("eks"), "aws_default") == NAMES.network_stack
    assert created == [{"VPCName": NAMES.run_key, "DataBucketName": BUCKET, "CreateNetwork": "false"}]


@pytest.mark.parametrize("platform", ["hyperpod", "parallelcluster", "batch", "local"])
def test_other_platforms_get_the_network(created, platform: str) -> None:
    assert network.needs_network(_spec(platform))
    network.create_network_stack(_spec(platform), "aws_default")
    assert created == [
        {
            "VPCName": NAMES.run_key,
            "DataBucketName": BUCKET,
            "CreateNetwork": "true",
            "SubnetsAZ": "us-east-1a",
            "FallbackSubnetAZ": "us-east-1b",
        }
    ]


def test_a_run_in_an_existing_vpc_gets_a_stack_with_only_the_bucket(created) -> None:
    spec = {**_spec("parallelcluster"), "existing_network": {"VPC": "vpc-0123456789abcdef0"}}
    assert network.needs_network(spec) and not network.makes_network(spec)
    network.create_network_stack(spec, "aws_default")
    assert created == [{"VPCName": NAMES.run_key, "DataBucketName": BUCKET, "CreateNetwork": "false"}]


# --- the subnets' zones -----------------------------------------------------------------------------------------------
# moto's us-east-1 has zones a to f; it offers p4de.24xlarge in b and c only, trn2.48xlarge in none.
@pytest.fixture
def stacks(moto_aws, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The parameters of each network stack created (in moto)."""
    calls: list[dict[str, str]] = []
    ensure_stack = StackHook.ensure_stack

    def record(self, name: str, body: str, parameters: dict[str, str], tags: dict[str, str]) -> dict:
        calls.append(parameters)
        return ensure_stack(self, name, body, parameters, tags)

    monkeypatch.setattr(StackHook, "ensure_stack", record)
    return calls


def test_the_subnets_go_where_the_instance_type_is_offered(stacks) -> None:
    """Not the region's first two zones (us-east-1a offers no p4de): the first two that offer the type."""
    network.create_network_stack(_spec("batch", "p4de.24xlarge"), "aws_default")
    assert (stacks[0]["SubnetsAZ"], stacks[0]["FallbackSubnetAZ"]) == ("us-east-1b", "us-east-1c")


def test_a_type_no_zone_offers_is_refused_before_anything_exists(stacks, moto_aws) -> None:
    spec = _spec("batch", "trn2.48xlarge")
    refused = "instance_type: got 'trn2.48xlarge'; no availability zone of us-east-1 offers it"
    with pytest.raises(AirflowFailException, match=re.escape(refused)):
        network.plan_network_stack(spec, "aws_default")
    with pytest.raises(AirflowFailException, match=re.escape(refused)):
        network.create_network_stack(spec, "aws_default")
    assert stacks == [] and moto_aws("cloudformation").list_stacks()["StackSummaries"] == []


def test_the_local_platforms_stack_needs_no_offering(stacks) -> None:
    """local.cpu is no EC2 type (no zone offers it) and no instance goes into the local run's subnets."""
    spec = _spec("local", "local.cpu")
    assert network.plan_network_stack(spec, "aws_default") == NAMES.network_stack
    network.create_network_stack(spec, "aws_default")
    assert (stacks[0]["SubnetsAZ"], stacks[0]["FallbackSubnetAZ"]) == ("us-east-1a", "us-east-1b")


ZONES = {"AvailabilityZones": [{"ZoneName": f"us-east-1{z}", "State": "available"} for z in "abcd"]}
AVAILABLE = [{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}]


@pytest.fixture
def ec2_stub(offline_aws: None, monkeypatch: pytest.MonkeyPatch):
    """The EC2 client of dtp.pipeline.network, answered by a Stubber (moto has no capacity reservations): four zones,
    p5.48xlarge offered in a, c and d."""
    hook = EC2Hook(aws_conn_id=None, region_name="us-east-1", api_type="client_type")
    hook.conn = hook.get_client_type(region_name="us-east-1")
    monkeypatch.setattr(network, "EC2Hook", lambda **kwargs: hook)
    offerings = [{"InstanceType": "p5.48xlarge", "LocationType": "availability-zone", "Location": f"us-east-1{z}"}
                 for z in "acd"]  # fmt: skip
    by_type = {"LocationType": "availability-zone", "Filters": [{"Name": "instance-type", "Values": ["p5.48xlarge"]}]}
    with Stubber(hook.conn) as stub:
        stub.add_response("describe_availability_zones", ZONES, {"Filters": AVAILABLE})
        stub.add_response("describe_instance_type_offerings", {"InstanceTypeOfferings": offerings}, by_type)
        yield stub
        stub.assert_no_pending_responses()


def test_the_primary_subnets_go_into_the_capacity_reservations_zone(ec2_stub, monkeypatch) -> None:
    extra = {"key_name": "k", "ssh_allowed_ips": "203.0.113.0/28", "capacity_reservation_id": "cr-0123456789abcdef0"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_PARALLELCLUSTER", json.dumps({"conn_type": "generic", "extra": extra}))
    reservation = {"CapacityReservationId": "cr-0123456789abcdef0", "AvailabilityZone": "us-east-1d"}
    ec2_stub.add_response(
        "describe_capacity_reservations",
        {"CapacityReservations": [reservation]},
        {"CapacityReservationIds": ["cr-0123456789abcdef0"]},
    )
    assert network.subnet_zones(_spec("parallelcluster"), "aws_default") == ("us-east-1d", "us-east-1a")


def test_the_primary_subnets_go_into_the_training_plans_zone(ec2_stub, monkeypatch) -> None:
    plan = "arn:aws:sagemaker:us-east-1:123456789012:training-plan/p5-reserved"
    extra = {
        "execution_role_arn": "arn:aws:iam::123456789012:role/dtp-hyperpod",
        "lifecycle_bucket": "sagemaker-dtp-lifecycle",
        "training_plans": {"p5.48xlarge": plan},
    }
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps({"conn_type": "generic", "extra": extra}))
    sagemaker = HyperPodHook(aws_conn_id=None, region_name="us-east-1")
    sagemaker.conn = sagemaker.get_client_type(region_name="us-east-1")
    monkeypatch.setattr(network, "HyperPodHook", lambda **kwargs: sagemaker)
    summary = {"ReservedCapacityArn": f"{plan}/reserved-capacity/rc-1", "InstanceType": "ml.p5.48xlarge",
               "TotalInstanceCount": 2, "Status": "Scheduled", "AvailabilityZone": "us-east-1c"}  # fmt: skip
    described = {"TrainingPlanArn": plan, "TrainingPlanName": "p5-reserved", "Status": "Scheduled",
                 "ReservedCapacitySummaries": [summary]}  # fmt: skip
    with Stubber(sagemaker.conn) as stub:
        stub.add_response("describe_training_plan", described, {"TrainingPlanName": plan})
        assert network.subnet_zones(_spec("hyperpod"), "aws_default") == ("us-east-1c", "us-east-1a")


def test_the_network_template_has_an_s3_endpoint_and_a_placement_group() -> None:
    """S3 traffic from the private subnets skips the NAT gateway; the placement group, exported, exists with or
    without the run's network (the emulator makes no placement groups: this is its one check)."""
    template, errors = decode_str(network.NETWORK_TEMPLATE.read_text())
    assert errors == []
    resources = template["Resources"]
    assert resources["S3GatewayEndpoint"] == {
        "Condition": "WithNetwork",
        "Type": "AWS::EC2::VPCEndpoint",
        "Properties": {
            "VpcEndpointType": "Gateway",
            "ServiceName": {"Fn::Sub": "com.amazonaws.${AWS::Region}.s3"},
            "VpcId": {"Ref": "VPC"},
            "RouteTableIds": [{"Ref": "PrivateRouteTable"}],
        },
    }
    assert resources["PlacementGroup"] == {
        "Type": "AWS::EC2::PlacementGroup",
        "Properties": {"Strategy": "cluster"},
    }
    assert template["Outputs"]["PlacementGroup"] == {
        "Value": {"Ref": "PlacementGroup"},
        "Export": {"Name": {"Fn::Sub": "${AWS::StackName}-PlacementGroup"}},
    }


INSTANCE_PROFILE = "arn:aws:iam::123456789012:instance-profile/dtp-ecs"
EXISTING = {
    "vpc_id": "vpc-0123456789abcdef0",
    "private_subnet": "subnet-0123456789abcdef0",
    "security_group": "sg-0123456789abcdef0",
}


def test_the_existing_network_comes_from_the_dtp_network_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert network.existing_network() == {}  # no connection: each run makes its own VPC
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": EXISTING}))
    assert network.existing_network() == {
        "VPC": "vpc-0123456789abcdef0",
        "PrivateSubnet": "subnet-0123456789abcdef0",
        "PublicSubnet": "subnet-0123456789abcdef0",  # ParallelCluster's head node goes there too
        "SecurityGroup": "sg-0123456789abcdef0",
    }
    bad = {**EXISTING, "security_group": "default"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": bad}))
    with pytest.raises(PlatformNotReady, match="connection 'dtp_network' extra: security_group: String should match"):
        network.existing_network()


@pytest.mark.parametrize(
    ("platform", "extra", "mounted"),
    [
        (
            "parallelcluster",
            {"key_name": "k", "ssh_allowed_ips": "203.0.113.0/28", "fsx_file_system_id": "fs-0123456789abcdef0"},
            "fs-0123456789abcdef0",
        ),
        ("batch", {"instance_role_arn": INSTANCE_PROFILE, "launch_template_id": "lt-0123456789abcdef0"}, "lt-0123"),
    ],
)
def test_a_platform_on_an_existing_file_system_needs_its_vpc_before_anything_exists(
    monkeypatch: pytest.MonkeyPatch, platform: str, extra: dict[str, str], mounted: str
) -> None:
    # The file system is reachable only from its own VPC (ParallelCluster refuses an FSx in another VPC outright).
    monkeypatch.setenv(f"AIRFLOW_CONN_DTP_{platform.upper()}", json.dumps({"conn_type": "generic", "extra": extra}))
    conf = {"platform": platform, "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 2}
    conf["budget_usd"] = 1000.0  # 2 h of setup on 2 x 98.32 USD/h, and the training
    with pytest.raises(ParamsError, match=f"platform: got '{platform}', whose nodes mount .*{mounted}.*'dtp_network'"):
        build_spec({}, conf, NAMES)
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": EXISTING}))
    spec = build_spec({}, conf, NAMES)
    assert spec["existing_network"]["PrivateSubnet"] == "subnet-0123456789abcdef0"


def test_the_platforms_without_network_exist() -> None:
    from dtp.platforms import _PLATFORMS

    assert set(_PLATFORMS) >= network.PLATFORMS_WITHOUT_NETWORK


# --- the run's tags on the bucket -----------------------------------------------------------------------------------
@pytest.fixture
def sweeper(offline_aws: None, monkeypatch: pytest.MonkeyPatch) -> RunResourceSweeper:
    """The sweeper network_outputs makes, its EC2, S3 and tagging clients answered by Stubbers (``stubs``)."""
    sweeper = RunResourceSweeper(aws_conn_id=None, region_name="us-east-1")
    sweeper.conn = sweeper.get_client_type(region_name="us-east-1")
    sweeper.s3.conn = sweeper.s3.get_client_type(region_name="us-east-1")
    monkeypatch.setattr(network, "RunResourceSweeper", lambda **kwargs: sweeper)
    return sweeper


@pytest.fixture
def stubs(sweeper: RunResourceSweeper):
    with Stubber(sweeper.conn) as ec2, Stubber(sweeper.s3.conn) as s3, Stubber(sweeper.tagging) as tagging:
        yield {"ec2": ec2, "s3": s3, "tagging": tagging}
        for stub in (ec2, s3, tagging):
            stub.assert_no_pending_responses()


def _outputs(monkeypatch: pytest.MonkeyPatch, outputs: dict[str, str]) -> None:
    monkeypatch.setattr(StackHook, "stack_outputs", lambda self, name: dict(outputs))


def _no_nat_gateways(ec2: Stubber) -> None:
    by_tag = {"Filters": [{"Name": "tag:dtp:run", "Values": [NAMES.run_key]}]}
    ec2.add_response("describe_nat_gateways", {"NatGateways": []}, by_tag)


def test_the_stacks_bucket_keeps_its_system_tags(stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stack-created bucket carries CloudFormation's system tags: a PutBucketTagging of the run's tags alone is
    refused by S3 ("System Tags cannot be removed by requester"). The run's missing tags are added through the
    Resource Groups Tagging API; no PutBucketTagging is sent (the Stubber would refuse it)."""
    _outputs(monkeypatch, {"VPC": "vpc-0123", "DataBucket": BUCKET})
    stubs["s3"].add_response("get_bucket_tagging", {"TagSet": SYSTEM_TAGS}, {"Bucket": BUCKET})
    stubs["tagging"].add_response(
        "tag_resources", {"FailedResourcesMap": {}}, {"ResourceARNList": [f"arn:aws:s3:::{BUCKET}"], "Tags": TAGS}
    )
    _no_nat_gateways(stubs["ec2"])
    assert network.network_outputs(_spec("batch"), "aws_default")["DataBucket"] == BUCKET


def test_stack_tags_already_on_the_bucket_are_not_written_again(stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS propagates the stack's tags (the run's) to the bucket: nothing is put, nothing is tagged."""
    _outputs(monkeypatch, {"VPC": "vpc-0123", "DataBucket": BUCKET})
    tag_set = SYSTEM_TAGS + [{"Key": k, "Value": v} for k, v in TAGS.items()]
    stubs["s3"].add_response("get_bucket_tagging", {"TagSet": tag_set}, {"Bucket": BUCKET})
    _no_nat_gateways(stubs["ec2"])
    network.network_outputs(_spec("batch"), "aws_default")


def test_a_bucket_only_stack_tags_its_bucket_and_looks_for_no_addresses(stubs, monkeypatch) -> None:
    """A bucket-only stack (EKS) has no NAT gateway: no address is looked for (the EC2 Stubber would refuse it)."""
    _outputs(monkeypatch, {"DataBucket": BUCKET})
    stubs["s3"].add_response("get_bucket_tagging", {"TagSet": SYSTEM_TAGS}, {"Bucket": BUCKET})
    stubs["tagging"].add_response(
        "tag_resources", {"FailedResourcesMap": {}}, {"ResourceARNList": [f"arn:aws:s3:::{BUCKET}"], "Tags": TAGS}
    )
    assert network.network_outputs(_spec("eks"), "aws_default") == {"DataBucket": BUCKET}
