"""The ParallelCluster platform: configurations rendered for shipped recipes pass aws-parallelcluster's own schema
(in .venv-pcluster, as scripts/setup makes it), violations are caught, no value can break the YAML, and
``pcluster create-cluster --dryrun true`` accepts a rendered configuration against the local AWS emulator, and a
pcluster command that AWS throttled fails with an error a poll waits out."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from parallelcluster_support import NETWORK, SSH_ALLOWED_IPS, make_spec, needs_pcluster, use_settings

from dtp.local.emulator import FAULTS_PATH
from dtp.platforms import get_platform
from dtp.platforms import parallelcluster as pc
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.pcluster_cli import DRYRUN_PASSED, PclusterError
from dtp.recipes import instance_types
from dtp.triggers.deadline import is_transient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Validators whose AWS calls the emulator cannot answer as AWS does (FACTS.md, offline validation).
# The emulator offers p5.48xlarge where AWS does (us-east-1), as pcluster's instance type validators check.
EMULATOR_REGION = "us-east-1"
EMULATOR_SUPPRESSED = ("KeyPairValidator", "HeadNodeLaunchTemplateValidator", "ComputeResourceLaunchTemplateValidator")


def config(documents: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(documents["cluster-config.yaml"])
    return parsed


def compute_resource(cfg: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = cfg["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]
    return resource


def test_the_registry_gives_the_platform() -> None:
    platform = get_platform("parallelcluster")
    assert isinstance(platform, pc.ParallelClusterPlatform)
    assert platform.scheduler == "slurm"


@pytest.mark.parametrize(
    ("instance_type", "family"),
    [("m5.2xlarge", "pcluster-cpu"), ("p5.48xlarge", "pcluster-gpu"), ("trn1.32xlarge", "pcluster-neuron")],
)
def test_the_nodes_boot_the_ami_family_of_their_accelerators(instance_type: str, family: str) -> None:
    assert pc.ParallelClusterPlatform().ami_family(instance_types()[instance_type].model_dump()) == family


@needs_pcluster
@pytest.mark.parametrize(
    ("recipe", "instance_type", "num_nodes", "settings", "ami"),
    [
        ("llama3_1_8b", "p5.48xlarge", 4, {}, None),
        ("llama3_1_70b", "p4de.24xlarge", 16, {"fsx_file_system_id": "fs-0123456789abcdef0"}, None),
        ("llama3_1_70b_megatron", "p5.48xlarge", 2, {"custom_ami": "ami-0123456789abcdef0"}, "ami-0aaaaaaaaaaaaaaaa"),
        ("llama3_1_8b_trn1", "trn1n.32xlarge", 2, {"capacity_reservation_id": "cr-0123456789abcdef0"}, None),
        (
            "llama3_1_8b",
            "p5.48xlarge",
            2,
            {"capacity_reservation_id": "cr-0123456789abcdef0", "capacity_type": "CAPACITY_BLOCK"},
            None,
        ),
        ("tiny", "g5.48xlarge", 1, {"os": "alinux2023", "fsx_storage_capacity_gib": 2400}, "ami-0aaaaaaaaaaaaaaaa"),
    ],
)
def test_rendered_configs_pass_the_parallelcluster_schema(
    monkeypatch, recipe, instance_type, num_nodes, settings, ami
) -> None:
    platform = use_settings(monkeypatch, key_name="dtp-head", **settings)
    spec = make_spec(recipe, instance_type, num_nodes)
    documents = platform.render(spec, NETWORK, ami)

    assert platform.check(documents, platform.cluster_name(spec)) == []
    cfg = config(documents)
    assert cfg["Region"] == "eu-west-1"
    assert cfg["HeadNode"]["Networking"] == {
        "SubnetId": NETWORK["PublicSubnet"],
        "AdditionalSecurityGroups": [NETWORK["SecurityGroup"]],
    }
    # Only the Airflow workers' egress reaches the head node's ssh (pcluster's default is the whole internet).
    assert cfg["HeadNode"]["Ssh"] == {"KeyName": "dtp-head", "AllowedIps": SSH_ALLOWED_IPS}
    queue = cfg["Scheduling"]["SlurmQueues"][0]
    assert queue["Networking"]["SubnetIds"] == [NETWORK["PrivateSubnet"]]
    resource = compute_resource(cfg)
    assert resource["InstanceType"] == instance_type
    assert resource["MinCount"] == resource["MaxCount"] == num_nodes
    assert resource["Efa"] == {"Enabled": True, "GdrSupport": True}
    assert {t["Key"]: t["Value"] for t in cfg["Tags"]} == spec["tags"]
    assert cfg["Monitoring"]["Logs"]["CloudWatch"] == {"Enabled": True, "RetentionInDays": 14}
    # The settings' AMI wins over the runtime's; with neither, pcluster's official AMI for the OS.
    expected_ami = settings.get("custom_ami") or ami
    assert cfg["Image"] == {
        "Os": settings.get("os", "ubuntu2204"),
        **({"CustomAmi": expected_ami} if expected_ami else {}),
    }
    fsx = cfg["SharedStorage"][0]
    assert fsx["MountDir"] == "/fsx" and fsx["StorageType"] == "FsxLustre"
    if "fsx_file_system_id" in settings:
        assert fsx["FsxLustreSettings"] == {"FileSystemId": settings["fsx_file_system_id"]}
    else:
        assert fsx["FsxLustreSettings"]["DeploymentType"] == "PERSISTENT_2"
        sized = platform.fsx_storage_capacity_gib(spec)
        assert fsx["FsxLustreSettings"]["StorageCapacity"] == settings.get("fsx_storage_capacity_gib", sized)
        assert fsx["FsxLustreSettings"]["PerUnitStorageThroughput"] == 250
    reservation = settings.get("capacity_reservation_id")
    assert queue.get("CapacityReservationTarget") == ({"CapacityReservationId": reservation} if reservation else None)
    assert queue["Networking"]["PlacementGroup"] == {"Enabled": not reservation}
    # A Capacity Block's instances launch only with its capacity type; any other reservation's on demand.
    assert queue["CapacityType"] == settings.get("capacity_type", "ONDEMAND")


def _mutated(documents: dict[str, str], change: Any) -> dict[str, str]:
    cfg = config(documents)
    change(cfg)
    return {"cluster-config.yaml": yaml.safe_dump(cfg)}


@needs_pcluster
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: compute_resource(c).update(Bogus=1), "ComputeResources.0.Bogus: Unknown field."),
        (lambda c: c["HeadNode"].update(Ssh={"KeyNam": "x"}), "HeadNode.Ssh.KeyNam: Unknown field."),
        (
            lambda c: compute_resource(c).update(MinCount=5, MaxCount=4),
            "ComputeResourceSizeValidator: Max count must be greater than or equal to min count.",
        ),
        (
            lambda c: compute_resource(c).update(InstanceType="p5.48xlarge; rm -rf /"),
            "ComputeResources.p5-48xlarge.InstanceType: 'p5.48xlarge; rm -rf /' is not an EC2 instance type",
        ),
        (lambda c: c["HeadNode"].update(InstanceType="m5.huge"), "HeadNode.InstanceType: 'm5.huge' is not an EC2"),
        (
            lambda c: c["SharedStorage"][0].update(FsxLustreSettings={"FileSystemId": "fs-123"}),
            "SharedStorage.0.FsxLustreSettings.FileSystemId: String does not match expected pattern.",
        ),
        (lambda c: c["Image"].update(Os="windows"), "Image.Os: Must be one of"),
        (lambda c: c["Tags"].append({"Key": "parallelcluster:x", "Value": "1"}), "parallelcluster:"),
    ],
)
def test_check_catches_real_violations(monkeypatch, change, expected) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    documents = platform.render(make_spec("llama3_1_8b", "p5.48xlarge", 2), NETWORK)
    problems = platform.check(_mutated(documents, change))
    assert any(expected in p for p in problems), problems


@needs_pcluster
def test_check_reports_yaml_that_does_not_parse(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    assert platform.check({"cluster-config.yaml": "Image: [unclosed"})[0].startswith("cluster-config.yaml: not valid")


@needs_pcluster
@pytest.mark.parametrize("dag_id", ["train_e2e", "A" * 250, "9-starts-with-a-digit", "dots.and spaces: and 'quotes'"])
def test_the_cluster_name_is_valid_for_pcluster_whatever_the_dag_id(monkeypatch, dag_id) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    spec = make_spec("tiny", "p5.48xlarge", 1, dag_id=dag_id)
    name = platform.cluster_name(spec)
    # pcluster's rule (PCLUSTER_NAME_REGEX), at most 40 characters so that Slurm accounting stays possible.
    assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9-]{0,39}", name)
    assert platform.check(platform.render(spec, NETWORK), name) == []
    assert any("ClusterNameValidator" in p for p in platform.check(platform.render(spec, NETWORK), "9" + name))


@needs_pcluster
def test_hostile_values_cannot_break_the_yaml(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="key: 'with' \"quotes\" # and\n- Key: injected")
    spec = make_spec("tiny", "p5.48xlarge", 2)
    hostile = {
        "dtp:run-id": 'manual__"2026": {x}\nTags:\n  - Key: aws:evil',
        "dtp:recipe": "a: b # c\r\n- d",
        "dtp:note": "'single' \\ back\\slash \t tab \u2028 <html>&",
    }
    spec["tags"] = {**spec["tags"], **hostile}
    network = {**NETWORK, "DataBucket": "bucket\nHeadNode: {}"}
    documents = platform.render(spec, network)
    cfg = config(documents)
    assert {t["Key"]: t["Value"] for t in cfg["Tags"]} == spec["tags"]
    assert cfg["HeadNode"]["Ssh"]["KeyName"] == platform.settings.key_name
    assert cfg["HeadNode"]["Iam"]["S3Access"][0]["BucketName"] == network["DataBucket"]
    assert set(cfg) == {"Region", "Imds", "Image", "HeadNode", "Scheduling", "SharedStorage", "Monitoring", "Tags"}
    # The value stays one scalar; only the schema's own bucket-name pattern objects to it.
    assert platform.check(documents) == [
        f"cluster-config.yaml: {path}.Iam.S3Access.0.BucketName: String does not match expected pattern."
        for path in ("HeadNode", "Scheduling.SlurmQueues.0")
    ]


def test_missing_settings_connection_is_named(monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_PARALLELCLUSTER", raising=False)
    with pytest.raises(PlatformNotReady, match=r"connection 'dtp_parallelcluster' is not defined; it holds the "):
        pc.ParallelClusterPlatform().max_nodes()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({}, "key_name: Field required"),
        ({"key_name": "k", "fsx_file_system_id": "fs-123"}, "fsx_file_system_id: String should match pattern"),
        ({"key_name": "k", "custom_ami": "ami-xyz"}, "custom_ami: String should match pattern"),
        ({"key_name": "k", "capacity_reservation_id": "cr-1"}, "capacity_reservation_id: String should match"),
        ({"key_name": "k", "capacity_type": "SPOT"}, "capacity_type: Input should be 'ONDEMAND' or 'CAPACITY_BLOCK'"),
        ({"key_name": "k", "capacity_type": "CAPACITY_BLOCK"}, "CAPACITY_BLOCK needs capacity_reservation_id"),
        ({"key_name": "k", "os": "windows"}, "os: Input should be"),
        ({"key_name": "k", "fsx_throughput_per_tib": 300}, "fsx_throughput_per_tib: Input should be"),
        ({"key_name": "k", "fsx_storage_capacity_gib": 1500}, "1200 GiB or a multiple of 2400 GiB"),
        ({"key_name": "k", "max_nodes": 0}, "max_nodes: Input should be greater than or equal to 1"),
        ({"key_name": "k", "keyname": "typo"}, "keyname: Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_name_the_connection_and_field(monkeypatch, extra, field) -> None:
    platform = use_settings(monkeypatch, **extra)
    with pytest.raises(PlatformNotReady, match=re.escape("connection 'dtp_parallelcluster' extra: ") + ".*" + field):
        platform.max_nodes()


@pytest.mark.parametrize(
    ("recipe", "num_nodes", "expected_gib"),
    [
        ("tiny", 1, 1200),
        # DTP's trainer keeps 2 checkpoints of 847 GB and writes a third: 2366 GiB, with a fifth more 2839 GiB.
        ("llama3_1_70b", 16, 4800),
        # Megatron-LM keeps all 6 of its 988 GB checkpoints while it trains: 5519 GiB, with a fifth more 6623 GiB.
        ("llama3_1_70b_megatron", 16, 7200),
        ("mixtral_8x7b", 8, 2400),  # 3 of 560 GB: 1566 GiB, with a fifth more 1879 GiB
    ],
)
def test_a_new_file_system_is_sized_to_the_runs_checkpoints(monkeypatch, recipe, num_nodes, expected_gib) -> None:
    spec = make_spec(recipe, "p5.48xlarge", num_nodes)
    assert use_settings(monkeypatch, key_name="k").fsx_storage_capacity_gib(spec) == expected_gib
    # Settings that fix the size win, whatever the run.
    fixed = use_settings(monkeypatch, key_name="k", fsx_storage_capacity_gib=2400)
    assert fixed.fsx_storage_capacity_gib(spec) == 2400


@pytest.mark.parametrize(
    ("ssh_allowed_ips", "problem"),
    [
        ("", "required: the IPv4 CIDR of the Airflow workers' egress"),
        ("0.0.0.0/0", "got 0.0.0.0/0, which opens the head node's ssh to the whole internet"),
        ("::/0", "got ::/0, which opens the head node's ssh to the whole internet"),
        ("2001:db8::/32", "got 2001:db8::/32; ParallelCluster takes an IPv4 CIDR"),
        ("203.0.113.7/24", "got '203.0.113.7/24', which is no CIDR: 203.0.113.7/24 has host bits set"),
        ("my-office", "got 'my-office', which is no CIDR"),
    ],
)
def test_a_cluster_is_refused_unless_ssh_allowed_ips_is_the_workers_egress(
    monkeypatch, ssh_allowed_ips, problem
) -> None:
    platform = use_settings(monkeypatch, key_name="k", ssh_allowed_ips=ssh_allowed_ips)
    assert platform.max_nodes() == 64  # the settings read: the teardown of a cluster made before the rule needs them
    field = "connection 'dtp_parallelcluster' extra: ssh_allowed_ips: "
    with pytest.raises(PlatformNotReady, match="^" + re.escape(field + problem)):
        platform.render(make_spec("tiny", "p5.48xlarge", 1), NETWORK)


def test_ssh_allowed_ips_is_rendered_as_the_cidr_it_names(monkeypatch) -> None:
    # A single address is the network of that one address, as pcluster's schema wants a CIDR.
    platform = use_settings(monkeypatch, key_name="k", ssh_allowed_ips="198.51.100.7")
    cfg = config(platform.render(make_spec("tiny", "p5.48xlarge", 1), NETWORK))
    assert cfg["HeadNode"]["Ssh"]["AllowedIps"] == "198.51.100.7/32"


def test_settings_give_capacity_and_the_slurm_connection(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="k", max_nodes=8)
    assert platform.max_nodes() == 8
    assert platform.settings.slurm_conn_id == "dtp_parallelcluster_slurm"
    assert platform.settings.pcluster == str(PROJECT_ROOT / ".venv-pcluster" / "bin" / "pcluster")


def test_check_without_the_pcluster_venv_says_where_it_comes_from(monkeypatch, tmp_path) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    documents = platform.render(make_spec("tiny", "p5.48xlarge", 1), NETWORK)
    monkeypatch.setattr(pc, "PCLUSTER_VENV", tmp_path / "absent")
    with pytest.raises(PlatformNotReady, match=r"scripts/setup installs it .* Amazon MWAA cannot install it"):
        platform.check(documents)


def test_the_airflow_image_has_the_pcluster_venv_where_the_platform_looks() -> None:
    """In the image, include/ is mounted at /opt/airflow/include: the platform looks beside it."""
    dockerfile = (pc.PROJECT_ROOT / "images" / "containers" / "airflow" / "Dockerfile").read_text()
    assert "RUN python -m venv /opt/airflow/.venv-pcluster" in dockerfile
    assert "-r /opt/dtp/requirements-pcluster.txt -c /opt/dtp/constraints-pcluster.txt" in dockerfile
    assert "nodejs" in dockerfile
    compose = (pc.PROJECT_ROOT / "docker-compose.yaml").read_text()
    assert "./include:/opt/airflow/include" in compose


def test_runtime_runs_the_published_image_with_pyxis(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    spec = make_spec("tiny", "p5.48xlarge", 1)
    runtime = platform.runtime("123456789012.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:abc", spec)
    assert runtime["image"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com#dtp/training:sha256:abc"
    assert runtime["enroot_credentials"].endswith("password $(aws ecr get-login-password --region us-east-1)")
    assert runtime["container_runtime"] == "pyxis" and runtime["training_dir"] == "/opt/dtp/training"
    default = platform.default_image()
    assert default["image"].startswith("nvcr.io#nvidia/pytorch:") and default["python"] == runtime["python"]


# --- against the local AWS emulator ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
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
