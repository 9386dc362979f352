"""The ParallelCluster platform: the registry gives it, its nodes boot the AMI family of their accelerators, the
dtp_parallelcluster connection's settings are checked field by field (the head node's ssh open only to the Airflow
workers' egress) and size a new file system, and the training runs in the published image with pyxis (the rendered
configuration: test_parallelcluster_config.py; pcluster against the local AWS emulator:
test_parallelcluster_emulator.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from parallelcluster_support import NETWORK, make_spec, use_settings

from dtp.platforms import get_platform
from dtp.platforms import parallelcluster as pc
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import instance_types

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def test_settings_give_capacity_and_the_slurm_connection(monkeypatch) -> None:
    platform = use_settings(monkeypatch, key_name="k", max_nodes=8)
    assert platform.max_nodes() == 8
    assert platform.settings.slurm_conn_id == "dtp_parallelcluster_slurm"
    assert platform.settings.pcluster == str(PROJECT_ROOT / ".venv-pcluster" / "bin" / "pcluster")


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
