"""Training container images (images/containers), the container_build form, and where runs find them.

Each image is ``images/containers/<image>/Dockerfile`` built with ``include/``
as its context (so the image carries DTP's training programs); its ``ARG``
defaults are the form's build-arg defaults. A pushed image is published, pinned
by digest, to the SSM parameter ``/dtp/images/<platform>/training``
(``.../neuron`` for the Neuron image: a platform with GPU and Trainium nodes runs
each on its own; train_e2e's resolve_images reads the one the run's instance
type needs) and as an event of the Asset ``oci://<registry>/<repository>``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from pydantic import Field, model_validator

from dtp.images import ami
from dtp.images.ami import IMAGES_DIR
from dtp.params import FormParams
from dtp.recipes import INCLUDE_DIR, Platform, instance_types

CONTAINERS_DIR = IMAGES_DIR / "containers"
TrainingImage = Literal["local-cpu", "training", "neuron"]
_ARG = re.compile(r"^ARG\s+([A-Z][A-Z0-9_]*)=(\S+)\s*$")
# A build arg's value goes into the Dockerfile's RUN commands and image references: a version or an image tag
# (NEURON_TAG is 41 characters), from an alphabet with nothing a shell would read.
BUILD_ARG = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,127}$"


def dockerfile(image: str) -> Path:
    return CONTAINERS_DIR / image / "Dockerfile"


@cache
def build_arg_defaults(image: str) -> dict[str, str]:
    """The ``ARG NAME=default`` lines of the image's Dockerfile."""
    return {m.group(1): m.group(2) for line in dockerfile(image).read_text().splitlines() if (m := _ARG.match(line))}


def training_parameter(platform: str, image: str = "training") -> str:
    """The SSM parameter runs on ``platform`` read for ``image``: the Neuron image has its own, since a platform
    with GPU and Trainium nodes needs both; the others share ``training``."""
    return f"/dtp/images/{platform}/{'neuron' if image == 'neuron' else 'training'}"


def image_platforms(image: str) -> list[str]:
    """The platforms whose nodes can run ``image``: the local profile's CPU nodes run local-cpu only; the CUDA image
    needs a platform offering GPU instance types, the Neuron image one offering Trainium."""
    if image == "local-cpu":
        return ["local"]
    wanted = "neuron" if image == "neuron" else "gpu"
    return sorted(
        {
            platform
            for instance in instance_types().values()
            if instance.accelerator != "cpu" and ("neuron" if instance.neuron_devices else "gpu") == wanted
            for platform in instance.platforms
        }
    )


class ContainerBuildParams(FormParams):
    """What a person may set when building a training image."""

    leading: ClassVar[tuple[str, ...]] = ("image", "platform")

    image: TrainingImage = Field(
        "local-cpu", title="Image", description="images/containers/<image>/Dockerfile (local-cpu: the local profile's)."
    )
    platform: Platform = Field(
        "local",
        title="Platform",
        description="Publish as /dtp/images/<platform>/training (the neuron image: .../neuron), where its runs look.",
    )
    build_args: dict[str, str] = Field(
        default_factory=dict,
        title="Build args",
        description='Overrides of the Dockerfile\'s ARG defaults, e.g. {"NCCL_VERSION": "2.28.3-1"}.',
    )

    @model_validator(mode="after")
    def _image_fits_platform(self) -> ContainerBuildParams:
        if self.platform not in (platforms := image_platforms(self.image)):
            raise ValueError(
                f"image {self.image!r} cannot run on platform {self.platform!r}'s nodes "
                f"(it runs on: {', '.join(platforms)})"
            )
        return self

    @model_validator(mode="after")
    def _known_args(self) -> ContainerBuildParams:
        allowed = build_arg_defaults(self.image)
        for name, value in self.build_args.items():
            if name not in allowed:
                raise ValueError(
                    f"build_args: {name!r} is not an ARG of {self.image}'s Dockerfile (allowed: {', '.join(allowed)})"
                )
            if not re.fullmatch(BUILD_ARG, value):
                raise ValueError(
                    f"build_args: {name}={value!r}: a version or image tag is expected (letters, digits and . + _ -,"
                    " at most 128, a letter or digit first), e.g. 2.28.3-1"
                )
        return self

    def build_request(self) -> dict[str, Any]:
        """ContainerImageBuildOperator's kwargs for this image."""
        return {
            "context_dir": str(INCLUDE_DIR),
            "dockerfile": str(dockerfile(self.image)),
            "repository": f"dtp/{self.image}",
            "build_args": {**build_arg_defaults(self.image), **self.build_args},
            "labels": {"dev.dtp.image": self.image, "dev.dtp.platform": self.platform},
        }


def resolve_runtime(platform: Any, instance: dict[str, Any], aws_conn_id: str | None) -> dict[str, str]:
    """The newest published training image for ``platform``, as the runtime its jobs use (the platform's default
    runtime when none is published), and the newest AMI of the family ``instance``'s nodes boot there."""
    ssm = SsmHook(aws_conn_id=aws_conn_id)
    image = ssm.get_parameter_value(
        training_parameter(platform.name, "neuron" if instance["neuron_devices"] else "training"), default=""
    )
    runtime = platform.runtime(image) if image else platform.default_image()
    family = platform.ami_family(instance)
    ami_id = ssm.get_parameter_value(ami.ssm_parameter(family), default="") if family else None
    return {**runtime, "ami": ami_id} if ami_id else runtime
