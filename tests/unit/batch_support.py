"""What the Batch platform tests share (test_platform_batch.py, test_batch_requests.py, test_batch_checks.py,
test_batch_provision.py): the dtp_batch connection's settings, a network stack's outputs, a run's spec and its requests
as the platform renders them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dtp.form_params import parse_params
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec

# What a real account's connection holds: multi-node and EFA jobs need the launch template.
SETTINGS = {
    "instance_role_arn": "arn:aws:iam::111122223333:instance-profile/dtp-ecs-instance",
    "launch_template_id": "lt-0123456789abcdef0",
}
# The documents a Batch run renders, in the order of its requests.
DOCUMENTS = ("compute-environment.json", "job-queue.json", "job-definition.json")
NETWORK = {"SecurityGroup": "sg-0123456789abcdef0", "PrivateSubnet": "subnet-0123456789abcdef0"}


def use_settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set the dtp_batch connection to ``SETTINGS``; the returned ``use(**extra)`` sets it again with ``extra`` over
    them."""

    def use(**extra: Any) -> None:
        conn = {"conn_type": "generic", "extra": {**SETTINGS, **extra}}
        monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps(conn))

    use()
    return use


def spec_for(**conf: Any) -> dict[str, Any]:
    """The spec of a Batch run on p5.48xlarge, of ``conf``."""
    params = parse_params(TrainParams, {"platform": "batch", "instance_type": "p5.48xlarge", **conf})
    return run_spec(params, "train_e2e", "manual__2026-12-02T10:00:00+00:00")


def requests(documents: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The compute environment, job queue and job definition requests of rendered ``documents``."""
    environment, queue, definition = (json.loads(documents[name]) for name in DOCUMENTS)
    return environment, queue, definition


def documents_of(environment: Any, queue: Any, definition: Any) -> dict[str, str]:
    """``requests`` reversed: the documents ``check`` reads."""
    return {
        name: json.dumps(request) for name, request in zip(DOCUMENTS, (environment, queue, definition), strict=True)
    }
