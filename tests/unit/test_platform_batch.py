"""The Batch platform's dtp_batch connection: its optional settings and image in the requests, and bad settings
refused naming the connection and the field (the requests: test_batch_requests.py; check: test_batch_checks.py)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from batch_support import NETWORK, requests, spec_for, use_settings

from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import BatchPlatform


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    return use_settings(monkeypatch)


def test_a_published_image_carries_the_programs(settings) -> None:
    spec = spec_for(recipe="tiny", instance_type="m5.2xlarge", num_nodes=2)
    platform = BatchPlatform()
    image = "111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "0" * 64
    runtime = platform.runtime(image, spec)
    assert runtime == {"source": f"image {image}", "image": image, "training_dir": "/opt/dtp/training"}
    _, _, definition = requests(platform.render(spec, NETWORK, runtime))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    assert container["image"] == image and "/opt/dtp/training/train.py" in container["command"]
    assert platform.default_image()["image"].startswith("nvcr.io/nvidia/pytorch:")
    assert "training_dir" not in platform.default_image()


def test_optional_settings_reach_the_compute_environment(settings) -> None:
    settings(
        service_role_arn="arn:aws:iam::111122223333:role/dtp-batch-service",
        launch_template_id="lt-0123456789abcdef0",
        image_uri="public.ecr.aws/example/pytorch:2.6",
        max_nodes=4,
    )
    platform = BatchPlatform()
    documents = platform.render(spec_for(num_nodes=2), NETWORK)
    assert platform.check(documents) == []
    environment, _, definition = requests(documents)
    assert environment["serviceRole"] == "arn:aws:iam::111122223333:role/dtp-batch-service"
    assert environment["computeResources"]["launchTemplate"] == {
        "launchTemplateId": "lt-0123456789abcdef0",
        "version": "$Latest",
    }
    assert definition["nodeProperties"]["nodeRangeProperties"][0]["container"]["image"] == (
        "public.ecr.aws/example/pytorch:2.6"
    )
    assert platform.max_nodes() == 4


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"instance_role_arn": "arn:aws:iam::111122223333:role/ecsInstanceRole"}, "instance_role_arn"),
        ({"service_role_arn": "AWSBatchServiceRole"}, "service_role_arn"),
        ({"launch_template_id": "lt-1; rm -rf /"}, "launch_template_id"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"instance_role": "ecsInstanceRole"}, "instance_role"),
    ],
)
def test_bad_settings_name_the_connection_and_field(settings, extra, field) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_batch' extra: {field}: "):
        BatchPlatform().max_nodes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"instance_role_arn": "arn:aws:iam::111122223333:instance-profile/ecsInstanceRole"},
            r"instance_role_arn: the instance profile's name 'ecsInstanceRole' must start with 'dtp-', with no path, "
            r"and so must its role's: the worker policy .* lets DTP pass only dtp-\* roles to Batch and EC2",
        ),
        (
            {"service_role_arn": "arn:aws:iam::111122223333:role/service-role/dtp-batch"},
            r"service_role_arn: the role's name 'service-role/dtp-batch' must start with 'dtp-', with no path",
        ),
        (  # a role Admin on the path /dtp-ops/: the worker policy's Deny on role/dtp-*/* keeps it from being passed
            {"service_role_arn": "arn:aws:iam::111122223333:role/dtp-ops/Admin"},
            r"service_role_arn: the role's name 'dtp-ops/Admin' must start with 'dtp-', with no path",
        ),
        (
            {"instance_role_arn": "arn:aws:iam::111122223333:instance-profile/dtp-ops/dtp-batch"},
            r"instance_role_arn: the instance profile's name 'dtp-ops/dtp-batch' must start with 'dtp-', with no path",
        ),
    ],
)
def test_roles_the_worker_policy_cannot_pass_are_refused(settings, extra, message) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match="^connection 'dtp_batch' extra: " + message):
        BatchPlatform().render(spec_for(), NETWORK)


def test_a_missing_instance_role_and_connection_say_what_to_set(settings, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps({"conn_type": "generic", "extra": {}}))
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' extra: instance_role_arn: Field required"):
        BatchPlatform().max_nodes()
    monkeypatch.delenv("AIRFLOW_CONN_DTP_BATCH")
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' is not defined; it holds the account's"):
        BatchPlatform().max_nodes()
