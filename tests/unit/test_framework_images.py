"""Each framework's recipes run from an image of its own: a stage of the GPU or Neuron Dockerfile that container_build
builds and publishes per platform. A run whose platform has no such image is refused before anything exists; with
one published, the run's jobs get the image and where the framework is in it. moto's SSM stands in for AWS's."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import pytest
from airflow.sdk.exceptions import AirflowFailException

from dtp.form_params import ParamsError, parse_params
from dtp.images import ami, container
from dtp.params import TrainParams
from dtp.pipeline.frameworks import FRAMEWORK_IMAGES, TEMPLATES, template_args
from dtp.pipeline.graph import validate_params
from dtp.pipeline.jobs import container_options
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.recipes import catalogue
from dtp.templates import TEMPLATE_DIR, render

FRAMEWORKS = sorted(FRAMEWORK_IMAGES)
REFERENCE = "registry.example.com/dtp/{image}@sha256:" + "c" * 64
_STAGE = re.compile(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


@pytest.fixture
def ssm(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ssm")


def publish(ssm: Any, platform: str, image: str) -> str:
    reference = REFERENCE.format(image=image)
    ssm.put_parameter(Name=container.training_parameter(platform, image), Value=reference, Type="String")
    return reference


def recipe_of(framework: str) -> str:
    return next(name for name, recipe in sorted(catalogue().items()) if recipe.framework == framework)


def spec_for(framework: str, platform: str = "parallelcluster", instance_type: str | None = None) -> dict[str, Any]:
    recipe = catalogue()[recipe_of(framework)]
    conf = {
        "platform": platform,
        "recipe": recipe.name,
        "instance_type": instance_type or recipe.defaults.instance_type,
        "num_nodes": recipe.defaults.num_nodes,
        "dataset_uri": "" if framework == "nemo" else "s3://dtp-data/prepared/",
    }
    return run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__2026-12-06T10:00:00+00:00")


def test_every_framework_with_a_launch_template_has_an_image_to_launch_from() -> None:
    assert set(FRAMEWORK_IMAGES) == set(TEMPLATES) - {"fsdp"}
    assert {recipe.framework for recipe in catalogue().values()} - {"fsdp"} <= set(FRAMEWORK_IMAGES)
    for framework, image in FRAMEWORK_IMAGES.items():
        # An image container_build offers, built at the framework's own stage of its Dockerfile.
        assert image.image in get_args(container.TrainingImage) and image.image in container.IMAGES
        build = container.IMAGES[image.image]
        stages = set(_STAGE.findall(container.dockerfile(image.image).read_text()))
        assert build.stages["FRAMEWORK"] == framework and set(build.stages.values()) <= stages
    assert set(get_args(container.TrainingImage)) == set(container.IMAGES)


def test_the_launch_templates_read_the_paths_the_image_layout_gives() -> None:
    # Where the image puts the framework, not a constant beside the template: a runtime saying otherwise wins.
    for framework in FRAMEWORKS:
        layout = {key: f"/elsewhere/{key}" for key in FRAMEWORK_IMAGES[framework].layout if key != "python"}
        args = template_args(spec_for(framework), layout, "/fsx/runs/r", "/fsx")
        assert set(layout.values()) <= set(map(str, args.values())), framework


@pytest.mark.parametrize("image", sorted(container.IMAGES))
def test_every_image_takes_its_own_build_args_and_picks_its_stages(image: str) -> None:
    build = container.IMAGES[image]
    platform = container.image_platforms(image)[0]
    defaults = container.build_arg_defaults(image)
    request = parse_params(
        container.ContainerBuildParams, {"image": image, "platform": platform, "build_args": defaults}
    ).build_request()
    assert request["build_args"] == {**defaults, **build.stages}
    assert request["dockerfile"].endswith(f"images/containers/{build.folder}/Dockerfile")
    assert request["repository"] == f"dtp/{image}"


def test_every_arg_of_a_dockerfile_is_some_images_to_set() -> None:
    offered = {name for image in container.IMAGES for name in container.build_arg_defaults(image)}
    for folder in {build.folder for build in container.IMAGES.values()}:
        text = (container.CONTAINERS_DIR / folder / "Dockerfile").read_text()
        declared = set(re.findall(r"^ARG\s+([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
        assert declared - set(container.STAGE_ARGS) <= offered, folder


def test_framework_images_pin_the_versions_their_templates_are_written_for() -> None:
    assert container.build_arg_defaults("torchtitan")["TORCHTITAN_VERSION"] == "0.3.0"
    assert container.build_arg_defaults("megatron-lm")["MEGATRON_LM_VERSION"] == "core_v0.12.1"
    assert re.fullmatch(r"[0-9a-f]{40}", container.build_arg_defaults("picotron")["PICOTRON_COMMIT"])
    assert re.fullmatch(
        r"[0-9a-f]{40}", container.build_arg_defaults("neuronx-distributed")["NEURONX_DISTRIBUTED_COMMIT"]
    )
    assert "NEMO_TAG" in container.build_arg_defaults("nemo") and "PYTORCH_TAG" not in container.build_arg_defaults(
        "nemo"
    )
    # The CUDA frameworks' fabric is the training image's, at the AMI's versions.
    versions = ami.default_versions()
    for image in ("training", "torchtitan", "megatron-lm", "picotron", "nemo"):
        args = container.build_arg_defaults(image)
        for arg in ("NCCL_VERSION", "EFA_INSTALLER_VERSION", "AWS_OFI_NCCL_VERSION", "NCCL_TESTS_VERSION"):
            assert args[arg] == versions[arg.lower()], (image, arg)


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"image": "torchtitan", "build_args": {"FRAMEWORK": "megatron-lm"}}, "'FRAMEWORK' picks the Dockerfile's"),
        ({"image": "training", "build_args": {"BASE": "ngc-nemo"}}, "'BASE' picks the Dockerfile's stages"),
        (
            {"image": "torchtitan", "build_args": {"MEGATRON_LM_VERSION": "core_v0.13.1"}},
            "not an ARG of image torchtitan",
        ),
        ({"image": "nemo", "platform": "local"}, "image 'nemo' cannot run on platform 'local''s nodes"),
        ({"image": "neuronx-distributed", "platform": "batch"}, "image 'neuronx-distributed' cannot run on platform"),
        ({"image": "megatron-lm", "platform": "hyperpod", "build_args": {"MEGATRON_LM_VERSION": "x; id"}}, "version"),
    ],
)
def test_container_build_refuses_what_would_mislabel_a_framework_image(conf: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(container.ContainerBuildParams, {"platform": "parallelcluster", **conf})


def test_each_image_is_published_where_its_runs_look() -> None:
    names = {container.training_parameter("eks", image) for image in container.IMAGES if image != "local-cpu"}
    assert len(names) == len(container.IMAGES) - 1  # one parameter each: none overwrites another
    assert container.training_parameter("parallelcluster", "torchtitan") == "/dtp/images/parallelcluster/torchtitan"
    # DTP's trainer's images keep their parameters.
    assert (
        container.training_parameter("local", "local-cpu")
        == container.training_parameter("local")
        == ("/dtp/images/local/training")
    )
    assert container.training_parameter("eks", "neuron") == "/dtp/images/eks/neuron"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_framework_recipe_without_its_image_is_refused_naming_what_to_publish(ssm, framework: str) -> None:
    spec = spec_for(framework)
    image = FRAMEWORK_IMAGES[framework].image
    problem = container.framework_image_problem(spec, "aws_default")
    assert problem is not None and problem.startswith(f"recipe: got {spec['recipe']['name']!r}; ")
    assert f"publish it with container_build image={image} platform=parallelcluster first" in problem
    # DTP's training image does not stand in for it: the job would find no framework there.
    publish(ssm, "parallelcluster", "training")
    assert container.framework_image_problem(spec, "aws_default") == problem
    publish(ssm, "parallelcluster", image)
    assert container.framework_image_problem(spec, "aws_default") is None


def test_validate_params_refuses_the_run_before_anything_exists(ssm, monkeypatch, installation) -> None:
    # HyperPod with Slurm: a platform whose nodes run another framework's batch script; NeMo reads no assets.
    extra = {"execution_role_arn": "arn:aws:iam::111122223333:role/dtp-hp", "lifecycle_bucket": "sagemaker-dtp-lc"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps({"conn_type": "generic", "extra": extra}))
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b_nemo", "instance_type": "p5.48xlarge", "budget_usd": 2000.0}
    run = SimpleNamespace(dag_id="train_e2e", run_id="manual__1", conf=conf, clear_number=0, logical_date=None,
                          run_type=SimpleNamespace(value="manual"))  # fmt: skip
    with pytest.raises(AirflowFailException) as refused:
        validate_params.function(params={}, dag_run=run)
    assert str(refused.value) == (
        "invalid parameters:\nrecipe: got 'llama3_1_8b_nemo'; nemo runs from its image 'nemo', which is not published "
        "for platform 'hyperpod' (no SSM parameter /dtp/images/hyperpod/nemo): publish it with container_build "
        "image=nemo platform=hyperpod first"
    )
    publish(ssm, "hyperpod", "nemo")
    assert validate_params.function(params={}, dag_run=run)["recipe"]["framework"] == "nemo"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_published_image_and_its_paths_reach_the_rendered_job(ssm, framework: str, tmp_path: Path) -> None:
    spec = spec_for(framework)
    reference = publish(ssm, "parallelcluster", FRAMEWORK_IMAGES[framework].image)
    runtime = container.resolve_runtime(get_platform("parallelcluster"), spec, "aws_default")
    assert (
        runtime["image"] == reference.replace("/", "#", 1).replace("@", ":") and runtime["container_runtime"] == "pyxis"
    )
    assert FRAMEWORK_IMAGES[framework].layout.items() <= runtime.items()
    workdir = str(tmp_path / "run")
    script = render(
        TEMPLATES[framework],
        num_nodes=spec["params"]["num_nodes"],
        procs_per_node=spec["instance"]["accelerators_per_node"],
        python=runtime["python"],
        omp_threads=8,
        env={},
        exclude_nodes="",
        container=container_options(runtime, "/fsx", workdir),
        enroot_login=None,
        **template_args(spec, runtime, workdir, "/fsx"),
    )
    assert f"--container-image={runtime['image']}" in script
    for key, path in FRAMEWORK_IMAGES[framework].layout.items():
        assert path in script, (framework, key)


def test_the_training_image_still_serves_dtps_trainer_and_nothing_published_means_the_default(ssm) -> None:
    p5, trn1 = spec_for("fsdp", instance_type="p5.48xlarge"), spec_for("fsdp", instance_type="trn1.32xlarge")
    platform = get_platform("parallelcluster")
    assert container.resolve_runtime(platform, p5, "aws_default") == platform.default_image()
    training = publish(ssm, "parallelcluster", "training")
    assert container.resolve_runtime(platform, p5, "aws_default")["image"] == training.replace("/", "#", 1).replace(
        "@", ":"
    )
    assert container.resolve_runtime(platform, trn1, "aws_default") == platform.default_image()
    # DTP's trainer is never refused for want of a framework image, and reads nothing to know it.
    assert container.framework_image_problem(spec_for("fsdp"), None) is None


def test_a_framework_image_deleted_after_validation_fails_resolve_images_saying_so(ssm) -> None:
    spec = spec_for("torchtitan")
    with pytest.raises(
        PlatformNotReady, match="publish it with container_build image=torchtitan platform=parallelcluster"
    ):
        container.resolve_runtime(get_platform("parallelcluster"), spec, "aws_default")


def _instructions(folder: str, stage: str) -> list[tuple[str, str]]:
    """The instructions of ``stage`` of ``folder``'s Dockerfile, as (keyword, arguments), continuation lines joined."""
    text = (container.CONTAINERS_DIR / folder / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()
    ]
    (start,) = [
        i for i, (keyword, args) in enumerate(instructions) if keyword == "FROM" and args.endswith(f" AS {stage}")
    ]
    end = next((i for i in range(start + 1, len(instructions)) if instructions[i][0] == "FROM"), len(instructions))
    return instructions[start + 1 : end]


def _expanded(text: str, env: dict[str, str]) -> str:
    """``text`` with the ``${NAME}`` of ``env``'s names replaced by their values, as docker expands them."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), text)


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The variables the stage's ENV instructions set, each expanded with those set before it."""
    env: dict[str, str] = {}
    for pair in (pair for keyword, args in instructions if keyword == "ENV" for pair in shlex.split(args)):
        name, value = pair.split("=", 1)
        env[name] = _expanded(value, env)
    return env


def test_nccl_loads_the_images_aws_ofi_nccl_plugin_and_tuner_by_name() -> None:
    # By name, not as whichever libnccl-net.so the loader finds first: an NGC base may bring net plugins of its own.
    cuda = _instructions("training", "cuda")
    env = _env(cuda)
    assert env["NCCL_NET_PLUGIN"] == "ofi" and env["NCCL_TUNER_PLUGIN"] == "ofi"
    # NCCL opens libnccl-net-<NCCL_NET_PLUGIN>.so and libnccl-tuner-<NCCL_TUNER_PLUGIN>.so; the build checks
    # aws-ofi-nccl installed both where LD_LIBRARY_PATH looks.
    (prefix,) = re.findall(r"--prefix=(\S+)", next(args for keyword, args in cuda if "aws-ofi-nccl" in args))
    assert f"{prefix}/lib" in env["LD_LIBRARY_PATH"].split(":")
    checks = [_expanded(args, env) for keyword, args in cuda if keyword == "RUN"]
    for library in ("libnccl-net-ofi.so", "libnccl-tuner-ofi.so"):
        assert any(f"test -e {prefix}/lib/{library}" in check for check in checks), library


def test_the_neuron_image_leaves_the_neuron_core_count_to_the_job() -> None:
    # The count differs between Trainium instance types (2 on trn1.2xlarge): the launch template sets it per run.
    assert "NEURON_RT_NUM_CORES" not in _env(_instructions("neuron", "fsdp"))
    launch = (TEMPLATE_DIR / TEMPLATES["neuronx-distributed"]).read_text()
    assert "export NEURON_RT_NUM_CORES={{ procs_per_node }}\n" in launch
