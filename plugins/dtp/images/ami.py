"""AMI families (images/packer), the ami_bake form, and where a baked AMI is published.

A family is a var file ``images/packer/families/<family>.pkrvars.hcl`` with a
playbook ``images/packer/ansible/<family>.yml``; the component versions'
defaults live in ``images/packer/versions.pkrvars.hcl``; a baked AMI is tagged
with its versions (``version_tag``). A baked AMI's id is published to the SSM
parameter ``/dtp/amis/<family>`` and as an event of the Asset
``dtp-ami://<family>`` whose extra carries the versions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, create_model, field_validator

from dtp.form_params import FormParams
from dtp.naming import TAG_PREFIX

IMAGES_DIR = Path(os.environ.get("DTP_IMAGES_DIR", Path(__file__).resolve().parents[3] / "images"))
PACKER_DIR = IMAGES_DIR / "packer"
TEMPLATE = PACKER_DIR / "ami.pkr.hcl"
VERSIONS_FILE = PACKER_DIR / "versions.pkrvars.hcl"
# A version string goes into an AMI tag, a URL and a shell-free argv: digits first, then a small alphabet.
VERSION = r"^[0-9][0-9A-Za-z.+_-]{0,31}$"
AMI_PARAMETER_PATH = "/dtp/amis"
# Marks packer's builder instances, which the reaper terminates once their expiry passes; a bake takes hours.
BUILDER_TAG = "dtp:packer-builder"
BUILDER_EXPIRY_HOURS = 12
_ASSIGNMENT = re.compile(r'^\s*(\w+)\s*=\s*"([^"]*)"\s*$')


def ami_families() -> list[str]:
    """Every family with a var file and a playbook."""
    return sorted(
        f.name.removesuffix(".pkrvars.hcl")
        for f in (PACKER_DIR / "families").glob("*.pkrvars.hcl")
        if (PACKER_DIR / "ansible" / f.name.replace(".pkrvars.hcl", ".yml")).is_file()
    )


@cache
def default_versions() -> dict[str, str]:
    """The ``name = "value"`` assignments of versions.pkrvars.hcl."""
    return _assignments(VERSIONS_FILE)


def family_file(family: str) -> Path:
    return PACKER_DIR / "families" / f"{family}.pkrvars.hcl"


def source_ami(family: str) -> dict[str, str]:
    """The filter the template picks ``family``'s source AMI with (the newest match): name pattern and owner."""
    assigned = _assignments(family_file(family))
    return {"name": assigned["source_ami_name"], "owner": assigned["source_ami_owner"]}


def _assignments(path: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in path.read_text().splitlines() if (m := _ASSIGNMENT.match(line))}


def ssm_parameter(family: str) -> str:
    return f"{AMI_PARAMETER_PATH}/{family}"


def asset_uri(family: str) -> str:
    return f"dtp-ami://{family}"


@cache
def neuron_releases() -> dict[str, list[str]]:
    """The Neuron SDK releases the neuron role can bake, with the packages it pins for each."""
    defaults = yaml.safe_load((PACKER_DIR / "ansible" / "roles" / "neuron" / "defaults" / "main.yml").read_text())
    return dict(defaults["neuron_releases"])


def fingerprint_inputs(family: str) -> list[str]:
    """What an AMI of ``family`` depends on besides template and var files: its playbook and the roles."""
    return [str(PACKER_DIR / "ansible" / f"{family}.yml"), str(PACKER_DIR / "ansible" / "roles")]


class _AmiBakeBase(FormParams):
    leading: ClassVar[tuple[str, ...]] = ("families",)

    families: list[str] = Field(
        ["pcluster-gpu"],
        min_length=1,
        title="AMI families",
        description="One bake per family: images/packer/families/<family>.pkrvars.hcl.",
        json_schema_extra={"uniqueItems": True, "items": {"type": "string", "enum": list(ami_families())}},
    )
    retain_days: int = Field(
        90, ge=1, le=3650, title="Keep for (days)", description="Expiry tag of the AMIs and snapshots, for the reaper."
    )

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        unknown = sorted(set(families) - set(ami_families()))
        if unknown:
            raise ValueError(f"unknown AMI families {unknown}; allowed: {', '.join(ami_families())}")
        if len(set(families)) != len(families):
            raise ValueError("each family may be listed once")
        return families

    @field_validator("neuron_version", check_fields=False)
    @classmethod
    def _pinned_neuron_release(cls, version: str) -> str:
        # The neuron role installs each release's packages at their versions: another release has none to install.
        if version not in neuron_releases():
            known = ", ".join(neuron_releases())
            raise ValueError(f"the neuron role pins no packages for Neuron {version}; known: {known}")
        return version

    def versions(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in default_versions()}


_COMPONENTS = {
    "nvidia_driver": "NVIDIA driver",
    "cuda": "CUDA",
    "efa_installer": "EFA installer",
    "nccl": "NCCL",
    "aws_ofi_nccl": "aws-ofi-nccl",
    "nccl_tests": "nccl-tests",
    "enroot": "enroot",
    "pyxis": "pyxis",
    "neuron": "Neuron SDK",
}


# The role installing a component, where it is not named after it.
_ROLES = {"efa_installer": "efa"}
_PLAYBOOK_ROLE = re.compile(r"^\s+- (\w+)\s*$")


@cache
def _playbook_roles(family: str) -> frozenset[str]:
    """The roles ``family``'s playbook lists by name."""
    lines = (PACKER_DIR / "ansible" / f"{family}.yml").read_text().splitlines()
    return frozenset(m.group(1) for line in lines if (m := _PLAYBOOK_ROLE.match(line)))


def families_installing(component: str) -> list[str]:
    """The families whose playbook runs the role that installs ``component`` (e.g. cuda: pcluster-gpu)."""
    role = _ROLES.get(component, component)
    return [family for family in ami_families() if role in _playbook_roles(family)]


def _version_field(name: str, default: str) -> Any:
    component = name.removesuffix("_version")
    display = _COMPONENTS.get(component, component)
    title = f"{display} version"
    return (
        str,
        Field(
            default,
            title=title,
            description=f"{display} in the {', '.join(families_installing(component)) or 'no'} AMIs.",
            pattern=VERSION,
            max_length=32,
        ),
    )


AmiBakeParams = create_model(
    "AmiBakeParams",
    __base__=_AmiBakeBase,
    __doc__="What a person may set when baking AMIs: the families, the component versions, the retention.",
    **{name: _version_field(name, value) for name, value in default_versions().items()},
)


def published_amis(ssm: Any) -> dict[str, str]:
    """The AMI id published under ``/dtp/amis/`` (the one runs use) of each family that has one, through the boto3
    SSM client ``ssm``; a parameter naming no family of this checkout is left out."""
    published = {
        parameter["Name"].rpartition("/")[2]: parameter["Value"]
        for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=AMI_PARAMETER_PATH)
        for parameter in page["Parameters"]
    }
    return {family: published[family] for family in sorted(published.keys() & set(ami_families()))}


def version_tag(name: str) -> str:
    """The AMI tag recording the version variable ``name`` (the template's ``local.versions``):
    ``nccl_tests_version`` is tagged ``dtp:nccl-tests``."""
    return TAG_PREFIX + name.removesuffix("_version").replace("_", "-")


def tagged_versions(tags: Mapping[str, str]) -> dict[str, str]:
    """The version variables an AMI's ``tags`` record; those it has no tag for are left out."""
    return {name: tags[version_tag(name)] for name in default_versions() if version_tag(name) in tags}


# The PackerBuildOperator arguments every bake shares, beside its ``bake_requests`` request: the template, its map
# variable that takes the AMI's tags (packer tags the AMI as it makes it), and the builder's expiry, counted from
# the time its bake starts.
COMMON_BAKE_ARGUMENTS: dict[str, Any] = {
    "template": str(TEMPLATE),
    "tags_variable": "image_tags",
    "builder_expiry_hours": BUILDER_EXPIRY_HOURS,
}


def bake_requests(
    params: Any, tags: dict[str, str], kept_versions: Mapping[str, Mapping[str, str]] | None = None
) -> list[dict[str, Any]]:
    """One bake request per family (for ``expand_kwargs``): the PackerBuildOperator arguments that differ between
    families and runs, besides ``COMMON_BAKE_ARGUMENTS``. A family bakes with ``params``' versions, but for those
    ``kept_versions`` gives it (a scheduled run's, from the AMI published now). ``tags`` are the AMI's; the
    instance that bakes it gets them too, marked as a builder."""
    builder_tags = {**tags, BUILDER_TAG: "true"}
    kept_versions = kept_versions or {}
    return [
        {
            "var_file": str(family_file(family)),
            "variables": {"family": family, **params.versions(), **kept_versions.get(family, {})},
            "name_prefix": f"dtp-{family}",
            "fingerprint_paths": fingerprint_inputs(family),
            "tags": tags,
            "builder_tags": builder_tags,
            "source_ami": source_ami(family),
        }
        for family in params.families
    ]
