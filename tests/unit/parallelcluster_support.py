"""What the ParallelCluster tests share: the pcluster virtualenv's marker, a network stack's outputs, the
connections the platform reads, and a run spec."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from dtp.form_params import parse_params
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms import parallelcluster as pc

# On CI (``CI`` set), where scripts/setup has made it, a missing .venv-pcluster fails these tests: no silent skip.
needs_pcluster = pytest.mark.skipif(
    not (pc.PCLUSTER_VENV / "bin" / "pcluster").exists() and not os.environ.get("CI"),
    reason=".venv-pcluster is missing (scripts/setup creates it): aws-parallelcluster's schema is not available",
)
NETWORK = {
    "VPC": "vpc-0123456789abcdef0",
    "PublicSubnet": "subnet-0123456789abcdef0",
    "PrivateSubnet": "subnet-0fedcba9876543210",
    "FallbackPrivateSubnet": "subnet-0aaaabbbbccccdddd",
    "SecurityGroup": "sg-0123456789abcdef0",
    "FSXSecurityGroup": "sg-0fedcba9876543210",
    "DataBucket": "dtp-train-e2e-0123456789-data",
}
# The Airflow workers' egress the settings open the head node's ssh to (a documentation range, RFC 5737).
SSH_ALLOWED_IPS = "203.0.113.0/28"


def use_settings(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None = None, region: str = "eu-west-1", **extra: Any
) -> pc.ParallelClusterPlatform:
    """Connections from the environment, as the stack sets them: the platform's settings (``extra``, the head node's
    ssh open to ``SSH_ALLOWED_IPS`` unless it says otherwise) and aws_default."""
    settings = {"ssh_allowed_ips": SSH_ALLOWED_IPS, **extra}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_PARALLELCLUSTER", json.dumps({"conn_type": "generic", "extra": settings}))
    aws_extra = {"region_name": region, **({"endpoint_url": endpoint} if endpoint else {})}
    aws = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": aws_extra}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(aws))
    return pc.ParallelClusterPlatform()


def make_spec(recipe: str, instance_type: str, num_nodes: int, dag_id: str = "train_e2e") -> dict[str, Any]:
    conf = {"platform": "parallelcluster", "recipe": recipe, "instance_type": instance_type, "num_nodes": num_nodes}
    return run_spec(parse_params(TrainParams, conf), dag_id, "manual__2026-12-02")
