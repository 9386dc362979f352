"""Training container images (images/containers), the container_build form, and where runs find them.

Each image is built from a Dockerfile under ``images/containers/`` with
``include/training/`` as its context (``BUILD_CONTEXT``: DTP's training programs,
all an image carries from the project); its ``ARG`` defaults are the form's
build-arg defaults. The images of other
frameworks than DTP's trainer are stages of the GPU (``training``) and Neuron
(``neuron``) Dockerfiles, on the same EFA/NCCL layers: ``IMAGES`` says which
Dockerfile and which stage (its ``FRAMEWORK`` and ``BASE`` build args). A pushed
image is published, pinned by digest, to the SSM parameter
``/dtp/images/<platform>/<image>`` (``.../training`` for the local profile's
``local-cpu``): a platform with GPU and Trainium nodes runs each on its own;
train_e2e's resolve_images reads the one the run's instance type and framework
need (a backfill run: the version that was the newest at its logical date).
And as an event of the Asset ``oci://<registry>/<repository>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from pydantic import Field, model_validator

from dtp.form_params import FormParams
from dtp.hooks.ami import AmiHook
from dtp.hooks.registry import ContainerRegistryHook
from dtp.images import ami
from dtp.images.ami import IMAGES_DIR
from dtp.images.published import published_ami, published_as_of, published_image
from dtp.pipeline.frameworks import FRAMEWORK_IMAGES
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import INCLUDE_DIR, Platform, instance_types

CONTAINERS_DIR = IMAGES_DIR / "containers"
# Every image's build context: all its Dockerfile copies, and nothing more. The image's tag fingerprints the context it
# is built from (ContainerImageBuildOperator), so a change elsewhere in include/ (a template, a recipe) rebuilds none.
BUILD_CONTEXT = INCLUDE_DIR / "training"
TrainingImage = Literal[
    "local-cpu", "training", "neuron", "torchtitan", "megatron-lm", "picotron", "nemo", "neuronx-distributed"
]
# Build args that pick an image's stages: the image's own (IMAGES), never a person's.
STAGE_ARGS = ("BASE", "FRAMEWORK")


@dataclass(frozen=True)
class ImageBuild:
    """How an image is built: ``images/containers/<folder>/Dockerfile`` up to the stages its ``stages`` build args
    pick (``FRAMEWORK``: the framework's stage; ``BASE``: the NGC image under the CUDA layers), and the accelerator of
    the nodes that run it."""

    folder: str
    accelerator: Literal["cpu", "gpu", "neuron"]
    stages: Mapping[str, str] = field(default_factory=dict)


IMAGES: dict[str, ImageBuild] = {
    "local-cpu": ImageBuild("local-cpu", "cpu"),
    "training": ImageBuild("training", "gpu"),
    "neuron": ImageBuild("neuron", "neuron"),
    "torchtitan": ImageBuild("training", "gpu", {"FRAMEWORK": "torchtitan"}),
    "megatron-lm": ImageBuild("training", "gpu", {"FRAMEWORK": "megatron-lm"}),
    "picotron": ImageBuild("training", "gpu", {"FRAMEWORK": "picotron"}),
    "nemo": ImageBuild("training", "gpu", {"FRAMEWORK": "nemo", "BASE": "ngc-nemo"}),
    "neuronx-distributed": ImageBuild("neuron", "neuron", {"FRAMEWORK": "neuronx-distributed"}),
}
_ARG = re.compile(r"^ARG\s+([A-Z][A-Z0-9_]*)=(\S+)\s*$")
_FROM = re.compile(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)
_ARG_REF = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# A build arg's value goes into the Dockerfile's RUN commands and image references: a version or an image tag
# (NEURON_TAG is 41 characters), from an alphabet with nothing a shell would read.
BUILD_ARG = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,127}$"


def dockerfile(image: str) -> Path:
    return CONTAINERS_DIR / IMAGES[image].folder / "Dockerfile"


@cache
def _stages(folder: str) -> tuple[dict[str, str], list[tuple[str, str | None, dict[str, str]]]]:
    """A Dockerfile's global ``ARG NAME=default`` lines, and its stages: what each is ``FROM``, its name, its ARGs."""
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, dict[str, str]]] = []
    for line in (CONTAINERS_DIR / folder / "Dockerfile").read_text().splitlines():
        if m := _FROM.match(line):
            stages.append((m.group(1), m.group(2), {}))
        elif m := _ARG.match(line):
            (stages[-1][2] if stages else global_args)[m.group(1)] = m.group(2)
    return global_args, stages


@cache
def build_arg_defaults(image: str) -> dict[str, str]:
    """The build args a person may override for ``image``, with their defaults: the ARGs of the stages it is built
    through (from its last ``FROM``, each stage's base resolved with the image's ``STAGE_ARGS``) and the global ARGs
    their ``FROM`` lines name, less the ``STAGE_ARGS``."""
    global_args, stages = _stages(IMAGES[image].folder)
    values = {**global_args, **IMAGES[image].stages}
    named = {name: (base, args) for base, name, args in stages if name}
    base, _, args = stages[-1]
    chain = [args]
    while True:
        chain.append({ref: global_args[ref] for ref in _ARG_REF.findall(base) if ref in global_args})
        base = _ARG_REF.sub(lambda ref: values.get(ref.group(1), ref.group(0)), base)
        if base not in named:
            break
        base, args = named[base]
        chain.append(args)
    found = {name: value for args in reversed(chain) for name, value in args.items()}
    return {name: value for name, value in found.items() if name not in STAGE_ARGS}


def training_parameter(platform: str, image: str = "training") -> str:
    """The SSM parameter runs on ``platform`` read for ``image``: each image its own (a platform with GPU and
    Trainium nodes runs DTP's trainer from ``training`` and ``neuron``, other frameworks from theirs), the local
    profile's ``local-cpu`` that of the image DTP's trainer runs from, ``training``."""
    return f"/dtp/images/{platform}/{'training' if image == 'local-cpu' else image}"


def image_platforms(image: str) -> list[str]:
    """The platforms whose nodes can run ``image``: the local profile's CPU nodes run local-cpu only; a CUDA image
    needs a platform offering GPU instance types, a Neuron image one offering Trainium."""
    wanted = IMAGES[image].accelerator
    if wanted == "cpu":
        return ["local"]
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
        "local-cpu",
        title="Image",
        description="From images/containers: local-cpu (the local profile's), training and neuron (DTP's trainer on "
        "GPU and Trainium nodes), or the image of another framework's recipes, a stage of those two.",
    )
    platform: Platform = Field(
        "local",
        title="Platform",
        description="Publish as /dtp/images/<platform>/<image> (local-cpu: .../training), where its runs look.",
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
            if name in STAGE_ARGS:
                raise ValueError(
                    f"build_args: {name!r} picks the Dockerfile's stages, which the image does: choose the image "
                    "(e.g. torchtitan) instead"
                )
            if name not in allowed:
                raise ValueError(
                    f"build_args: {name!r} is not an ARG of image {self.image}'s stages of its Dockerfile (allowed: "
                    f"{', '.join(allowed)})"
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
            "context_dir": str(BUILD_CONTEXT),
            "dockerfile": str(dockerfile(self.image)),
            "repository": f"dtp/{self.image}",
            "build_args": {**build_arg_defaults(self.image), **self.build_args, **IMAGES[self.image].stages},
            "labels": {"dev.dtp.image": self.image, "dev.dtp.platform": self.platform},
        }


def runtime_image(framework: str, instance: dict[str, Any]) -> str:
    """The image a run of ``framework`` on ``instance``'s nodes runs from: the framework's own, or for DTP's trainer
    the one for the nodes' accelerator."""
    if framework in FRAMEWORK_IMAGES:
        return FRAMEWORK_IMAGES[framework].image
    return "neuron" if instance["neuron_devices"] else "training"


def _unpublished(framework: str, platform: str) -> str:
    image = FRAMEWORK_IMAGES[framework].image
    return (
        f"{framework} runs from its image {image!r}, which is not published for platform {platform!r} (no SSM "
        f"parameter {training_parameter(platform, image)}): publish it with container_build image={image} "
        f"platform={platform} first"
    )


def framework_image_problem(spec: dict[str, Any], aws_conn_id: str | None) -> str | None:
    """Why the run cannot start on its platform: its recipe's framework runs from an image of its own that
    container_build has not published there (a read of SSM, before anything exists); None for DTP's trainer, whose
    runs fall back to the platform's default runtime."""
    framework, platform = spec["recipe"]["framework"], spec["params"]["platform"]
    if framework not in FRAMEWORK_IMAGES:
        return None
    parameter = training_parameter(platform, FRAMEWORK_IMAGES[framework].image)
    if SsmHook(aws_conn_id=aws_conn_id).get_parameter_value(parameter, default=""):
        return None
    return f"recipe: got {spec['recipe']['name']!r}; {_unpublished(framework, platform)}"


def resolve_runtime(platform: Any, spec: dict[str, Any], aws_conn_id: str | None) -> dict[str, str]:
    """The newest image published on ``platform`` for the run ``spec``'s recipe's framework, as the runtime its jobs
    use, with where the framework is in it (``FRAMEWORK_IMAGES``); for DTP's trainer the platform's default runtime
    when none is published. And the newest AMI of the family the run's nodes boot there. A backfill run gets those
    that were the newest at its logical date instead (``dtp.images.published``). A run is refused
    (``PlatformNotReady``) when its image was deleted from its registry since it was published, a backfill run also
    when its AMI was deregistered."""
    instance, framework = spec["instance"], spec["recipe"]["framework"]
    ssm = SsmHook(aws_conn_id=aws_conn_id)
    as_of = published_as_of(spec)
    parameter = training_parameter(platform.name, runtime_image(framework, instance))
    image = published_image(ssm, ContainerRegistryHook(), parameter, as_of)
    if framework in FRAMEWORK_IMAGES:
        if not image:  # validate_params refused it; the parameter was deleted since
            raise PlatformNotReady(_unpublished(framework, platform.name))
        runtime = {**platform.runtime(image, spec), **FRAMEWORK_IMAGES[framework].layout}
    else:
        runtime = platform.runtime(image, spec) if image else platform.default_image()
    family = platform.ami_family(instance)
    ami_id = published_ami(ssm, AmiHook(aws_conn_id=aws_conn_id), ami.ssm_parameter(family), as_of) if family else None
    return {**runtime, "ami": ami_id} if ami_id else runtime
