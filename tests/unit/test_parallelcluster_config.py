"""The ParallelCluster platform's cluster configuration: configurations rendered for shipped recipes pass
aws-parallelcluster's own schema (in .venv-pcluster, as scripts/setup makes it), violations are caught, and no value
can break the YAML (the platform and its settings: test_platform_parallelcluster.py; pcluster against the local AWS
emulator: test_parallelcluster_emulator.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from parallelcluster_support import NETWORK, SSH_ALLOWED_IPS, make_spec, needs_pcluster, use_settings

from dtp.platforms import parallelcluster as pc
from dtp.platforms.base import PlatformNotReady


def config(documents: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(documents["cluster-config.yaml"])
    return parsed


def compute_resource(cfg: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = cfg["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]
    return resource


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


def test_ssh_allowed_ips_is_rendered_as_the_cidr_it_names(monkeypatch) -> None:
    # A single address is the network of that one address, as pcluster's schema wants a CIDR.
    platform = use_settings(monkeypatch, key_name="k", ssh_allowed_ips="198.51.100.7")
    cfg = config(platform.render(make_spec("tiny", "p5.48xlarge", 1), NETWORK))
    assert cfg["HeadNode"]["Ssh"]["AllowedIps"] == "198.51.100.7/32"


def test_check_without_the_pcluster_venv_says_where_it_comes_from(monkeypatch, tmp_path) -> None:
    platform = use_settings(monkeypatch, key_name="k")
    documents = platform.render(make_spec("tiny", "p5.48xlarge", 1), NETWORK)
    monkeypatch.setattr(pc, "PCLUSTER_VENV", tmp_path / "absent")
    with pytest.raises(PlatformNotReady, match=r"scripts/setup installs it .* Amazon MWAA cannot install it"):
        platform.check(documents)
