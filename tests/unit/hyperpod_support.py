"""What the HyperPod tests share: the dtp_hyperpod connection's settings (the ``settings`` fixture of conftest.py sets
them), a run's names, and a run's spec."""

from __future__ import annotations

from typing import Any

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
