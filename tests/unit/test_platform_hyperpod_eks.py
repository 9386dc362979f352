"""HyperPod on EKS: the nodes of a run's cluster join the EKS cluster the dtp_hyperpod connection names, in its VPC,
and the run's PyTorchJobs run on them."""

from __future__ import annotations

import json

import pytest
import yaml
from hyperpod_support import NAMES, spec_for

from dtp.form_params import ParamsError
from dtp.pipeline.spec import build_spec
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.eks import EksPlatform
from dtp.platforms.hyperpod import HyperPodPlatform

EKS_ARN = "arn:aws:eks:us-east-1:111122223333:cluster/dtp-training"
ON_EKS = {"base_config_uri": "s3://dtp-lifecycle/eks-base-config/", "eks": {"cluster_arn": EKS_ARN}}
# The EKS cluster's VPC, as the dtp_network connection names it (dtp.pipeline.network.ExistingNetwork).
EKS_VPC = {
    "vpc_id": "vpc-0123456789abcdef0",
    "private_subnet": "subnet-0aaaaaaaaaaaaaaaa",
    "fallback_private_subnet": "subnet-0bbbbbbbbbbbbbbbb",
    "security_group": "sg-0cccccccccccccccc",
}


@pytest.fixture
def eks_vpc(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The dtp_network connection naming the EKS cluster's VPC; the outputs the runs' clusters go into."""
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": EKS_VPC}))
    return {
        "VPC": EKS_VPC["vpc_id"],
        "PrivateSubnet": EKS_VPC["private_subnet"],
        "PublicSubnet": EKS_VPC["private_subnet"],
        "FallbackPrivateSubnet": EKS_VPC["fallback_private_subnet"],
        "SecurityGroup": EKS_VPC["security_group"],
    }


def test_on_eks_the_nodes_join_the_eks_cluster_labelled_with_the_run(settings, eks_vpc) -> None:
    settings(**ON_EKS)
    spec = {**spec_for(recipe="llama3_1_8b", num_nodes=4), "existing_network": eks_vpc}
    platform = HyperPodPlatform()
    documents = platform.render(spec, eks_vpc)
    assert set(documents) == {"cluster-config.json"}  # no Slurm provisioning parameters: the base-config's own
    assert platform.check(documents) == []
    request = json.loads(documents["cluster-config.json"])
    assert request["Orchestrator"] == {"Eks": {"ClusterArn": EKS_ARN}} and request["NodeRecovery"] == "Automatic"
    (group,) = request["InstanceGroups"]  # no controller group
    assert (group["InstanceGroupName"], group["InstanceType"], group["InstanceCount"]) == (
        "compute-nodes",
        "ml.p5.48xlarge",
        4,
    )
    assert group["KubernetesConfig"] == {"Labels": {"dtp.dev/run": spec["names"]["run_key"]}}
    vpc = {"SecurityGroupIds": [EKS_VPC["security_group"]], "Subnets": [EKS_VPC["private_subnet"]]}
    assert request["VpcConfig"] == vpc  # the EKS cluster's VPC, where the nodes reach its control plane
    assert platform.scheduler == "kubernetes"


def test_on_eks_a_run_outside_the_eks_clusters_vpc_is_refused_before_anything_exists(
    settings, eks_vpc, monkeypatch
) -> None:
    # The nodes must reach the EKS control plane from its VPC: a VPC made for the run (no dtp_network) cannot.
    settings(**ON_EKS, fsx_dns_name="", fsx_mount_name="")
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "budget_usd": 2000.0}
    assert build_spec({}, conf, NAMES)["existing_network"] == eks_vpc  # the nodes go into the EKS cluster's VPC
    monkeypatch.delenv("AIRFLOW_CONN_DTP_NETWORK")
    with pytest.raises(PlatformNotReady, match=r"EKS cluster dtp-training .* define the 'dtp_network' connection"):
        build_spec({}, conf, NAMES)
    # A Slurm-orchestrated cluster brings its own controller: the run's own VPC serves it.
    settings(fsx_dns_name="", fsx_mount_name="")
    assert build_spec({}, conf, NAMES)["existing_network"] == {}


def test_on_eks_the_runs_pytorchjobs_run_on_its_healthy_nodes(settings) -> None:
    settings(**{**ON_EKS, "eks": {"cluster_arn": EKS_ARN, "namespace": "training"}})
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    platform = HyperPodPlatform()
    runtime = platform.runtime("111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "0" * 64, spec)
    assert runtime["training_dir"] == "/opt/dtp/training" and "container_runtime" not in runtime  # no pyxis
    documents = platform.pytorchjobs(spec, runtime)
    assert EksPlatform.check(EksPlatform(), documents) == []
    for text in documents.values():
        job = yaml.safe_load(text)
        assert job["metadata"]["namespace"] == "training"
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        assert pod["nodeSelector"] == {
            "dtp.dev/run": spec["names"]["run_key"],
            "sagemaker.amazonaws.com/node-health-status": "Schedulable",
        }
    assert platform.default_image()["image"].startswith("nvcr.io/nvidia/pytorch:")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"eks": {"cluster_arn": EKS_ARN}}, "eks needs base_config_uri"),
        ({**ON_EKS, "eks": {"cluster_arn": "dtp-training"}}, "eks.cluster_arn: String should match pattern"),
    ],
)
def test_on_eks_settings_name_what_is_missing(settings, extra, problem) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match=f"connection 'dtp_hyperpod' extra: .*{problem}"):
        _ = HyperPodPlatform().scheduler


def test_on_eks_another_frameworks_recipe_is_refused_before_anything_exists(settings, eks_vpc) -> None:
    settings(**ON_EKS)
    conf = {"platform": "hyperpod", "instance_type": "p5.48xlarge", "num_nodes": 4, "budget_usd": 2000.0}
    assert build_spec({}, {**conf, "recipe": "llama3_1_8b"}, NAMES)["params"]["platform"] == "hyperpod"
    with pytest.raises(ParamsError, match="which trains with nemo; on hyperpod DTP runs its own FSDP trainer"):
        build_spec({}, {**conf, "recipe": "llama3_1_8b_nemo"}, NAMES)
