"""ami_bake's validate_params against moto's SSM and EC2: a scheduled run also bakes every family published before,
with the versions of the AMI it publishes now; a run triggered by hand bakes the form's families with the form's
versions; every bake's builder is tagged as one."""

from __future__ import annotations

import logging
import re
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


@pytest.fixture
def ec2(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ec2")


def publish(ssm: Any, *names: str, ami_id: str = "ami-0123456789abcdef0") -> None:
    for name in names:
        ssm.put_parameter(Name=name, Value=ami_id, Type="String", Overwrite=True)


def baked_ami(ec2: Any, family: str, **versions: str) -> str:
    """An AMI of ``family`` tagged as the template tags it (``local.versions``), with the defaults but ``versions``;
    its id."""
    tags = {"dtp:family": family, **{ami.version_tag(n): v for n, v in (ami.default_versions() | versions).items()}}
    image_id = ec2.register_image(Name=f"dtp-{family}-0123456789ab")["ImageId"]
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return image_id


def bake(run_type: str, conf: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    run = SimpleNamespace(dag_id="ami_bake", run_id=f"{run_type}__1", run_type=run_type, conf=conf, clear_number=0)
    return validate_params.function(params={}, dag_run=run)


def families(requests: list[dict[str, Any]]) -> list[str]:
    return [request["variables"]["family"] for request in requests]


def test_published_amis_are_those_of_the_known_families_under_the_ami_path(ssm) -> None:
    publish(ssm, "/dtp/amis/pcluster-neuron", "/dtp/amis/retired-family", "/dtp/images/eks")
    publish(ssm, "/dtp/amis/eks-gpu", ami_id="ami-0eks0000000000000")
    assert ami.published_amis(ssm) == {"eks-gpu": "ami-0eks0000000000000", "pcluster-neuron": "ami-0123456789abcdef0"}


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


def versions_of(requests: list[dict[str, Any]], family: str) -> dict[str, str]:
    [variables] = [r["variables"] for r in requests if r["variables"]["family"] == family]
    return {name: variables[name] for name in ami.default_versions()}


def test_the_template_tags_every_version_as_the_scheduled_run_reads_it() -> None:
    block = re.search(r"locals \{\s*versions = \{(.*?)\}", ami.TEMPLATE.read_text(), re.S)
    assert block, "ami.pkr.hcl has no local.versions"
    tagged = dict(re.findall(r'"(dtp:[\w-]+)"\s*=\s*var\.(\w+)', block[1]))
    assert {ami.version_tag(name): name for name in ami.default_versions()}.items() <= tagged.items()


def test_a_scheduled_run_rebakes_a_published_family_with_its_published_versions(ssm, ec2, caplog) -> None:
    # Baked by hand with a newer NCCL and nccl-tests: next Sunday's run must not put the form's defaults back.
    manual = {"nccl_version": "2.28.3-1", "nccl_tests_version": "2.17.1"}
    publish(ssm, "/dtp/amis/eks-gpu", ami_id=baked_ami(ec2, "eks-gpu", **manual))
    with caplog.at_level(logging.INFO, logger="dtp.pipeline.ami_bake"):
        requests = bake("scheduled")
    assert families(requests) == ["eks-gpu", "pcluster-gpu"]
    assert versions_of(requests, "eks-gpu") == ami.default_versions() | manual
    assert versions_of(requests, "pcluster-gpu") == ami.default_versions()  # never published: the form's
    assert "eks-gpu: keeping the versions of the published AMI" in caplog.text
    assert "nccl_version=2.28.3-1" in caplog.text


def test_a_run_triggered_by_hand_bakes_the_forms_versions_over_the_published_ones(ssm, ec2) -> None:
    publish(ssm, "/dtp/amis/eks-gpu", ami_id=baked_ami(ec2, "eks-gpu", nccl_version="2.28.3-1"))
    assert versions_of(bake("manual", {"families": ["eks-gpu"]}), "eks-gpu") == ami.default_versions()
    requests = bake("manual", {"families": ["eks-gpu"], "nccl_version": "2.29.0-1"})
    assert versions_of(requests, "eks-gpu")["nccl_version"] == "2.29.0-1"


def test_a_version_the_published_ami_lacks_or_the_form_refuses_now_is_the_forms(ssm, ec2, caplog) -> None:
    # An AMI baked before nccl-tests was tagged; a Neuron release the neuron role no longer pins.
    image_id = baked_ami(ec2, "pcluster-neuron", nccl_version="2.28.3-1", neuron_version="2.19.0")
    ec2.delete_tags(Resources=[image_id], Tags=[{"Key": ami.version_tag("nccl_tests_version")}])
    publish(ssm, "/dtp/amis/pcluster-neuron", ami_id=image_id)
    with caplog.at_level(logging.INFO, logger="dtp.pipeline.ami_bake"):
        versions = versions_of(bake("scheduled"), "pcluster-neuron")
    assert versions == ami.default_versions() | {"nccl_version": "2.28.3-1"}
    assert "not keeping neuron_version of" in caplog.text and "the form's for nccl_tests_version" in caplog.text


def test_a_published_family_whose_ami_is_gone_bakes_the_forms_versions(ssm, ec2) -> None:
    image_id = baked_ami(ec2, "eks-gpu", nccl_version="2.28.3-1")
    ec2.deregister_image(ImageId=image_id)
    publish(ssm, "/dtp/amis/eks-gpu", ami_id=image_id)
    assert versions_of(bake("scheduled"), "eks-gpu") == ami.default_versions()
