"""The ``dtp_hyperpod`` connection's settings: the account's HyperPod settings and, for HyperPod on EKS, the EKS
cluster its nodes join."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from dtp.naming import PASSED_ROLE_PREFIX, passed_role_name, passed_role_problem
from dtp.platforms.base import PlatformSettings
from dtp.platforms.eks import PyTorchJobSettings

TRAINING_PLAN_ARN = r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:training-plan/[\w-]{1,64}$"


class HyperPodEksSettings(PyTorchJobSettings):
    """the EKS cluster a HyperPod cluster's nodes join: cluster_arn, and where the run's PyTorchJobs go"""

    cluster_arn: str = Field(pattern=r"^arn:aws[a-z-]*:eks:[a-z0-9-]+:\d{12}:cluster/[0-9A-Za-z][A-Za-z0-9_-]{0,99}$")

    @property
    def cluster_name(self) -> str:
        return self.cluster_arn.rsplit("/", 1)[1]


class HyperPodSettings(PlatformSettings):
    """the account's HyperPod settings: execution_role_arn, lifecycle_bucket and optional FSx, base-config, sizes"""

    execution_role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
    # The instance role's managed policy (AmazonSageMakerClusterInstanceRolePolicy) reads only sagemaker-* buckets.
    lifecycle_bucket: str = Field(pattern=r"^sagemaker-[a-z0-9.-]{1,52}$")
    base_config_uri: str = Field("", pattern=r"^$|^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[\w./-]*$")
    controller_instance_type: str = "ml.m5.12xlarge"
    # Reserved capacity per instance type (SageMaker flexible training plans), tried before on-demand.
    training_plans: dict[str, Annotated[str, Field(pattern=TRAINING_PLAN_ARN)]] = Field(default_factory=dict)
    fsx_dns_name: str = ""
    fsx_mount_name: str = ""
    slurm_conn_id: str = "dtp_hyperpod_slurm"
    max_nodes: int = Field(64, ge=1)
    create_timeout_minutes: int = Field(90, ge=1)
    # The nodes' interpreter (with torch) when no training image is published for hyperpod.
    python: str = "/usr/bin/python3"
    # The EKS orchestrator (HyperPod on EKS); absent, the cluster's orchestrator is Slurm.
    eks: HyperPodEksSettings | None = None

    @model_validator(mode="after")
    def _eks_needs_its_lifecycle_scripts(self) -> HyperPodSettings:
        if self.eks is not None and not self.base_config_uri:
            raise ValueError("eks needs base_config_uri: the reference's EKS lifecycle scripts (on_create.sh)")
        return self

    def creation_problems(self) -> list[str]:
        """Why a cluster may not be created with these settings, each as ``field: message``: an execution role the
        worker policy does not let DTP pass (CreateCluster would be refused). Not a validator: a connection from
        before the rule still reads, so that the clusters made with it can be torn down."""
        if problem := passed_role_problem(self.execution_role_arn):
            return [
                f"execution_role_arn: the role's name {passed_role_name(self.execution_role_arn)!r} {problem}: the "
                f"worker policy (docs/iam/dtp-worker-policy.json) lets DTP pass only {PASSED_ROLE_PREFIX}* roles to "
                "SageMaker"
            ]
        return []
