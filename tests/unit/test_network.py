"""dtp.pipeline.network without the emulator: which stack a run's platform gets (the dtp_network connection's
existing VPC included), and how the run's tags reach the stack's bucket (botocore Stubbers answer as AWS does,
where the emulator does not; the emulator runs are in tests/integration/test_network_stack.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.stub import Stubber

from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.naming import RunNames, expiry, resource_tags
from dtp.params import ParamsError
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


def _spec(platform: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"keep_cluster": False}
    if platform is not None:
        params["platform"] = platform
    return {"params": params, "names": NAMES.as_dict(), "tags": TAGS}


# --- which stack ----------------------------------------------------------------------------------------------------
@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The parameters of each ensure_stack call; the region has zones a and b."""
    calls: list[dict[str, str]] = []

    def ensure_stack(self, name: str, body: str, parameters: dict[str, str], tags: dict[str, str]) -> dict:
        assert name == NAMES.network_stack and tags == TAGS
        calls.append(parameters)
        return {}

    monkeypatch.setattr(StackHook, "ensure_stack", ensure_stack)
    monkeypatch.setattr(network, "availability_zones", lambda conn_id: ["us-east-1a", "us-east-1b"])
    return calls


def test_an_eks_run_gets_a_stack_with_only_the_bucket(created, monkeypatch: pytest.MonkeyPatch) -> None:
    """EKS runs on its cluster's VPC: no VPC, NAT gateway or Elastic IP of the run's, and no zones are looked up."""

    def no_zones(conn_id: str) -> list[str]:
        raise AssertionError("a bucket-only stack needs no availability zones")

    monkeypatch.setattr(network, "availability_zones", no_zones)
    assert not network.needs_network(_spec("eks"))
    assert network.create_network_stack(_spec("eks"), "aws_default") == NAMES.network_stack
    assert created == [{"VPCName": NAMES.run_key, "DataBucketName": BUCKET, "CreateNetwork": "false"}]


@pytest.mark.parametrize("platform", ["hyperpod", "parallelcluster", "batch", "local", None])
def test_other_platforms_get_the_network(created, platform: str | None) -> None:
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


INSTANCE_PROFILE = "arn:aws:iam::123456789012:instance-profile/ecs"
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
        ("parallelcluster", {"key_name": "k", "fsx_file_system_id": "fs-0123456789abcdef0"}, "fs-0123456789abcdef0"),
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
        build_spec({}, conf, "train_e2e", "manual__1")
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": EXISTING}))
    spec = build_spec({}, conf, "train_e2e", "manual__1")
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
