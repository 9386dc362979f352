"""What the HyperPod tests share: the dtp_hyperpod connection's settings (the ``settings`` fixture of conftest.py sets
them), a run's names, a run's spec, and SageMaker's answers to a teardown."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from botocore.stub import Stubber

from dtp.form_params import parse_params
from dtp.naming import RunNames
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec

SETTINGS = {
    "execution_role_arn": "arn:aws:iam::111122223333:role/dtp-hyperpod-execution",
    "lifecycle_bucket": "sagemaker-dtp-lifecycle",
    "fsx_dns_name": "fs-0123456789abcdef0.fsx.us-east-1.amazonaws.com",
    "fsx_mount_name": "abcdefgh",
}
NAMES = RunNames("train_e2e", "manual__1")


def spec_for(**conf: Any) -> dict[str, Any]:
    """The spec of a HyperPod run on p5.48xlarge, of ``conf``."""
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "p5.48xlarge", **conf})
    return run_spec(params, "train_e2e", "manual__2026-12-02T10:00:00+00:00")


def stub_teardown(stub: Stubber, name: str, status: str = "InService", arn: str | None = None) -> None:
    """SageMaker's answers to ``start_teardown`` of the cluster ``name`` (its ARN ``arn``, by default one ending in the
    name), ``status`` at first. The jobs' controller is out of reach (no dtp_hyperpod_slurm connection): logged, the
    deletion goes on; no DescribeCluster after the deletion (the Stubber would refuse one): the wait is the
    trigger's."""
    arn = arn or f"arn:aws:sagemaker:us-east-1:111122223333:cluster/{name}"
    described = {
        "ClusterArn": arn,
        "ClusterName": name,
        "ClusterStatus": status,
        "CreationTime": datetime(2026, 12, 6, tzinfo=UTC),
        "InstanceGroups": [],
    }
    stub.add_response("describe_cluster", described, {"ClusterName": name})
    stub.add_response("describe_cluster", described, {"ClusterName": name})  # delete_cluster's own look
    if status == "InService":  # a retried teardown's cluster, already Deleting, is not deleted again
        stub.add_response("delete_cluster", {"ClusterArn": arn}, {"ClusterName": name})
