"""Every shipped recipe renders for every AWS platform that offers its instance type, and the service's own schema
accepts what it renders (or the platform refuses the recipe, by name, before anything is sent)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parallelcluster_support import NETWORK  # every output of the network stack

from dtp.form_params import parse_params
from dtp.images.ami import ami_families
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import PLATFORMS, catalogue, instance_types

# The least each platform's dtp_<platform> connection holds (see README, Platforms).
SETTINGS = {
    "hyperpod": {
        "execution_role_arn": "arn:aws:iam::111122223333:role/dtp-hyperpod-execution",
        "lifecycle_bucket": "sagemaker-dtp-lifecycle",
    },
    "parallelcluster": {"key_name": "dtp-head", "ssh_allowed_ips": "203.0.113.0/28"},
    "eks": {"cluster_name": "dtp-training"},
    "batch": {
        "instance_role_arn": "arn:aws:iam::111122223333:instance-profile/dtp-ecs-instance",
        "launch_template_id": "lt-0123456789abcdef0",
    },
}
# DTP launches other frameworks (torchtitan, Megatron-LM, neuronx-distributed, picotron, NeMo) with Slurm batch
# scripts only.
SLURM_ONLY = {"eks", "batch"}
CASES = [
    (recipe.name, platform)
    for recipe in catalogue().values()
    for platform in SETTINGS
    if platform in instance_types()[recipe.defaults.instance_type].platforms
]


@pytest.mark.parametrize(("recipe", "platform"), CASES, ids=[f"{r}-{p}" for r, p in CASES])
def test_recipe_renders_for_the_platform(monkeypatch: pytest.MonkeyPatch, recipe: str, platform: str) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_DTP_{platform.upper()}", json.dumps({"conn_type": "generic", "extra": SETTINGS[platform]})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", "extra": {"region_name": "us-east-1"}})
    )
    defaults = catalogue()[recipe].defaults
    conf: dict[str, Any] = {"platform": platform, "recipe": recipe, "instance_type": defaults.instance_type}
    spec = run_spec(parse_params(TrainParams, {**conf, "num_nodes": defaults.num_nodes}), "train_e2e", "manual__1")
    target = get_platform(platform)
    if platform in SLURM_ONLY and spec["recipe"]["framework"] != "fsdp":
        with pytest.raises(PlatformNotReady, match=f"uses {spec['recipe']['framework']}"):
            target.render(spec, NETWORK)
        return
    documents = target.render(spec, NETWORK)
    assert documents and target.check(documents) == []


def test_every_recipe_renders_somewhere_beyond_the_local_platform() -> None:
    assert {recipe for recipe, _ in CASES} == set(catalogue()) - {"tiny", "tiny_deep"}


@pytest.mark.parametrize("platform_name", ["local", *SETTINGS])
def test_every_instance_type_boots_an_ami_family_ami_bake_bakes_or_none(platform_name: str) -> None:
    platform = get_platform(platform_name)
    offered = [spec for spec in instance_types().values() if platform_name in spec.platforms]
    assert offered
    for instance in offered:
        assert platform.ami_family(instance.model_dump()) in {*ami_families(), None}


def test_every_platform_a_recipe_may_name_is_registered() -> None:
    assert [get_platform(name).name for name in PLATFORMS] == list(PLATFORMS)
