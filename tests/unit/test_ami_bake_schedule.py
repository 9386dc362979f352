"""ami_bake's validate_params against moto's SSM: a scheduled run also bakes every family published before, a run
triggered by hand bakes the form's families only, and every bake's builder is tagged as one."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from dtp.images import ami
from dtp.pipeline.ami_bake import validate_params

pytestmark = pytest.mark.usefixtures("installation")


@pytest.fixture
def ssm(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ssm")


def publish(ssm: Any, *names: str) -> None:
    for name in names:
        ssm.put_parameter(Name=name, Value="ami-0123456789abcdef0", Type="String")


def bake(run_type: str, conf: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    run = SimpleNamespace(dag_id="ami_bake", run_id=f"{run_type}__1", run_type=run_type, conf=conf, clear_number=0)
    return validate_params.function(params={}, dag_run=run)


def families(requests: list[dict[str, Any]]) -> list[str]:
    return [request["variables"]["family"] for request in requests]


def test_published_families_are_the_known_ones_under_the_ami_path(ssm) -> None:
    publish(ssm, "/dtp/amis/pcluster-neuron", "/dtp/amis/eks-gpu", "/dtp/amis/retired-family", "/dtp/images/eks")
    assert ami.published_families(ssm) == ["eks-gpu", "pcluster-neuron"]


def test_a_scheduled_run_bakes_the_default_and_every_published_family(ssm) -> None:
    assert families(bake("scheduled")) == ["pcluster-gpu"]  # nothing published yet: the form's default
    publish(ssm, "/dtp/amis/pcluster-neuron", "/dtp/amis/eks-gpu")
    assert families(bake("scheduled")) == ["eks-gpu", "pcluster-gpu", "pcluster-neuron"]


def test_a_run_triggered_by_hand_bakes_the_families_asked_for(ssm) -> None:
    publish(ssm, "/dtp/amis/pcluster-neuron", "/dtp/amis/eks-gpu")
    requests = bake("manual", {"families": ["pcluster-cpu"]})
    assert families(requests) == ["pcluster-cpu"]
    tags, builder_tags = requests[0]["tags"], requests[0]["builder_tags"]
    assert builder_tags == {**tags, ami.BUILDER_TAG: "true"} and tags["dtp:run"]
    assert requests[0]["builder_expiry_hours"] == ami.BUILDER_EXPIRY_HOURS
