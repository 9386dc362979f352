"""pcluster against the local AWS emulator: ``pcluster create-cluster --dryrun true`` accepts a rendered
configuration and refuses a broken one with pcluster's own message, and a pcluster command that AWS throttled fails
with an error a poll waits out (the rendered configuration: test_parallelcluster_config.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from parallelcluster_support import make_spec, needs_pcluster, use_settings

from dtp.local.emulator import FAULTS_PATH
from dtp.platforms.pcluster_cli import DRYRUN_PASSED, PclusterError
from dtp.triggers.deadline import is_transient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Validators whose AWS calls the emulator cannot answer as AWS does (FACTS.md, offline validation).
# The emulator offers p5.48xlarge where AWS does (us-east-1), as pcluster's instance type validators check.
EMULATOR_REGION = "us-east-1"
EMULATOR_SUPPRESSED = ("KeyPairValidator", "HeadNodeLaunchTemplateValidator", "ComputeResourceLaunchTemplateValidator")


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """The local AWS emulator, started for this module on a free port: its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtp.local.emulator", "--port", str(port)],
        cwd=PROJECT_ROOT,
        # AWS managed policies (AmazonSSMManagedInstanceCore, ...) exist, as pcluster's IAM validator expects.
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
            "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the emulator did not listen on {url} within 20 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def emulated_network(emulator: str) -> tuple[dict[str, str], str]:
    """A run network (the network stack's outputs) and a baked AMI, created in the emulator."""
    import boto3

    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=EMULATOR_REGION)
    ec2 = session.client("ec2", endpoint_url=emulator)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{EMULATOR_REGION}a")["Subnet"][
            "SubnetId"
        ]
        for i in (1, 2)
    ]
    groups = [ec2.create_security_group(GroupName=g, Description=g, VpcId=vpc)["GroupId"] for g in ("efa", "fsx")]
    ec2.create_key_pair(KeyName="dtp-head")
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1, InstanceType="m5.large")["Instances"][0]
    ami = ec2.create_image(InstanceId=instance["InstanceId"], Name="dtp-pcluster-gpu-test")["ImageId"]
    network = {
        "VPC": vpc,
        "PublicSubnet": subnets[0],
        "PrivateSubnet": subnets[1],
        "SecurityGroup": groups[0],
        "FSXSecurityGroup": groups[1],
        "DataBucket": "dtp-train-e2e-0123456789-data",
    }
    return network, ami


@needs_pcluster
def test_pcluster_dryrun_accepts_the_rendered_config_against_the_emulator(
    monkeypatch, emulator, emulated_network, first_event
):
    network, ami = emulated_network
    platform = use_settings(monkeypatch, endpoint=emulator, region=EMULATOR_REGION, key_name="dtp-head")
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    name = platform.cluster_name(spec)
    config_text = platform.render(spec, network, ami)["cluster-config.yaml"]

    answer = platform.cli.create_cluster(name, config_text, dryrun=True, suppress_validators=EMULATOR_SUPPRESSED)
    assert answer["message"] == DRYRUN_PASSED
    # Nothing was created: the cluster does not exist, its wait fails at once, and teardown finds nothing to delete.
    assert platform.cluster_status(name) is None
    event = first_event(platform.ready_trigger({"cluster_name": name, "created_at": time.time()}))
    assert event == {"status": "failed", "message": f"cluster {name} does not exist"}
    assert platform.teardown(spec) == {"cluster_name": name, "cancelled_jobs": [], "deleted": False}


@needs_pcluster
def test_pcluster_dryrun_refusal_carries_pcluster_s_message(monkeypatch, emulator, emulated_network) -> None:
    network, ami = emulated_network
    platform = use_settings(monkeypatch, endpoint=emulator, region=EMULATOR_REGION, key_name="dtp-head")
    spec = make_spec("llama3_1_8b", "p5.48xlarge", 2)
    config_text = platform.render(spec, {**network, "PrivateSubnet": "subnet-00000000000000000"}, ami)
    with pytest.raises(PclusterError, match=r"create-cluster exited 1: .*subnet-00000000000000000"):
        platform.cli.create_cluster(
            platform.cluster_name(spec),
            config_text["cluster-config.yaml"],
            dryrun=True,
            suppress_validators=EMULATOR_SUPPRESSED,
        )


def set_faults(emulator: str, rules: list[dict[str, Any]]) -> None:
    """Make the emulator fail the calls ``rules`` match (none: no more faults)."""
    request = urllib.request.Request(emulator + FAULTS_PATH, data=json.dumps({"rules": rules}).encode(), method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


@needs_pcluster
@pytest.mark.parametrize(("code", "throttled"), [("ThrottlingException", True), ("AccessDenied", False)])
def test_a_pcluster_command_aws_throttled_fails_with_an_error_a_poll_waits_out(
    monkeypatch, emulator, code: str, throttled: bool
) -> None:
    platform = use_settings(monkeypatch, endpoint=emulator, region=EMULATOR_REGION, key_name="dtp-head")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # pcluster's botocore gives up at once, as after its retries
    message = "Rate exceeded" if throttled else "User is not authorized to perform: cloudformation:DescribeStacks"
    set_faults(emulator, [{"service": "cloudformation", "action": "DescribeStacks", "code": code, "status": 400,
                           "message": message}])  # fmt: skip
    try:
        with pytest.raises(PclusterError, match=f"describe-cluster exited 1: .*{message}") as failed:
            platform.cli.describe_cluster("dtp-absent")
    finally:
        set_faults(emulator, [])
    assert failed.value.throttled is throttled
    assert is_transient(failed.value) is throttled
    assert platform.cli.describe_cluster("dtp-absent") is None  # once AWS answers again
