"""Recipes (include/recipes/*.yaml) and the instance-type table, as validated data.

Reading the catalogue touches local files only, so DAG files can call it at
parse time. A broken recipe file raises ``RecipeError`` naming the file.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INCLUDE_DIR = Path(os.environ.get("DTP_INCLUDE_DIR", Path(__file__).resolve().parents[2] / "include"))
RECIPE_DIR = INCLUDE_DIR / "recipes"
PLATFORMS = ("local", "parallelcluster", "hyperpod", "eks", "batch")
Platform = Literal["local", "parallelcluster", "hyperpod", "eks", "batch"]


class RecipeError(ValueError):
    """A recipe file that is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipeDefaults(_Strict):
    """The recipe's defaults of the run parameters (the regression DAG's form starts from them)."""

    platform: Platform
    instance_type: str
    # Tried in order when the cloud has no capacity for the run's instance type (dtp.platforms.capacity).
    fallback_instance_types: list[str] = Field(default_factory=list)
    num_nodes: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    checkpoint_interval: int = Field(ge=1)


class Gates(_Strict):
    """Pass/fail thresholds a run is judged by."""

    final_loss_max: float | None = None
    min_tokens_per_s: float | None = None
    loss_must_decrease: bool = True
    # Against the median of recent comparable runs (same recipe, hardware, nodes and steps):
    max_loss_regression: float = Field(0.10, ge=0)  # final loss may be at most 10% higher
    max_throughput_regression: float = Field(0.30, ge=0, le=1)  # tokens/s may be at most 30% lower
    history_runs: int = Field(10, ge=1)
    min_history_runs: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _judged_at_all(self) -> Gates:
        # More runs than the median is taken over would never be there: the regression gates would never judge.
        if self.min_history_runs > self.history_runs:
            raise ValueError(
                f"min_history_runs ({self.min_history_runs}) must be at most history_runs ({self.history_runs})"
            )
        return self


class Parallelism(_Strict):
    """How the model is split over the job's accelerators; what is left over is data parallel (sharded)."""

    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    context: int = Field(1, ge=1)

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context


# How each framework's trainer can split the model, besides sharding it (DTP's FSDP trainer: sharding only).
FRAMEWORK_PARALLELISM = {
    "fsdp": set(),
    "torchtitan": {"tensor", "pipeline", "context"},
    "megatron-lm": {"tensor", "pipeline", "context"},
    "nemo": {"tensor", "pipeline", "context"},
    "picotron": {"tensor", "pipeline", "context"},
    "neuronx-distributed": {"tensor"},  # what train_neuronx passes: its Llama trainer's other splits are not wired
}
# Micro-batches per pipeline stage that each data-parallel replica trains on a step under pipeline parallelism:
# the pipeline fills and drains once a step, idle (its bubble) for stages - 1 of micro-batches + stages - 1 slots.
PIPELINE_MICRO_BATCHES_PER_STAGE = 4


class Recipe(_Strict):
    """One model at one size, with how to train it and what a good run looks like."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]{0,62}$")
    description: str
    framework: Literal["fsdp", "torchtitan", "megatron-lm", "nemo", "picotron", "neuronx-distributed"]
    model: str
    precision: Literal["fp32", "bf16", "fp8"]
    seq_len: int = Field(ge=8)
    micro_batch: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block: DTP's trainer (fsdp); other frameworks have their own
    parallelism: Parallelism = Field(default_factory=Parallelism)
    defaults: RecipeDefaults
    expected_step_seconds: float = Field(gt=0)
    gates: Gates = Field(default_factory=Gates)
    schedule: str | None = None

    @model_validator(mode="after")
    def _compile_is_the_trainers(self) -> Recipe:
        if self.compile and self.framework != "fsdp":
            raise ValueError(f"compile is DTP's trainer's option (framework fsdp); {self.framework} has its own")
        return self

    @model_validator(mode="after")
    def _fp8_is_megatrons(self) -> Recipe:
        # Only the Megatron-LM launch turns fp8 into a flag (--fp8-format); DTP's trainer would train in fp32.
        if self.precision == "fp8" and self.framework != "megatron-lm":
            raise ValueError(f"precision fp8 is launched for framework megatron-lm only, not {self.framework!r}")
        return self

    @model_validator(mode="after")
    def _framework_can_split_so(self) -> Recipe:
        split = {name for name in ("tensor", "pipeline", "context") if getattr(self.parallelism, name) > 1}
        unsupported = split - FRAMEWORK_PARALLELISM[self.framework]
        if unsupported:
            raise ValueError(f"framework {self.framework!r} has no {'/'.join(sorted(unsupported))} parallelism")
        return self

    def ranks(self, num_nodes: int, accelerators_per_node: int) -> tuple[int, int]:
        """(world size, data-parallel replicas) on ``num_nodes`` nodes; raises when the split does not fit."""
        world = num_nodes * accelerators_per_node
        if world % self.parallelism.model_parallel:
            raise RecipeError(
                f"recipe {self.name!r} splits the model over {self.parallelism.model_parallel} accelerators "
                f"(tensor x pipeline x context), which does not divide {world} ({num_nodes} nodes x "
                f"{accelerators_per_node})"
            )
        return world, world // self.parallelism.model_parallel

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each data-parallel replica trains on a step: one, or under pipeline parallelism
        ``PIPELINE_MICRO_BATCHES_PER_STAGE`` per stage (a bubble of 1/9 of the step over two stages)."""
        pipeline = self.parallelism.pipeline
        return PIPELINE_MICRO_BATCHES_PER_STAGE * pipeline if pipeline > 1 else 1

    def tokens_per_step(self, num_nodes: int, accelerators_per_node: int) -> int:
        """Tokens the job trains on a step on ``num_nodes`` nodes: each replica's micro-batches of sequences."""
        replicas = self.ranks(num_nodes, accelerators_per_node)[1]
        return replicas * self.micro_batches_per_step * self.micro_batch * self.seq_len


class InstanceType(_Strict):
    """One entry of include/instance_types.yaml: where it is offered, its accelerators, price and expected
    bandwidth."""

    platforms: list[Platform]
    accelerator: str
    accelerators_per_node: int = Field(ge=1)
    peak_flops: float | None
    price_usd_per_hour: float = Field(ge=0)
    expected_busbw_gbps: float = Field(gt=0)
    busbw_at_bytes: int = Field(gt=0)
    collective_test: Literal["nccl-tests", "nccom-test", "torch"]
    vcpus: int | None = Field(None, ge=1)
    memory_gib: int | None = Field(None, ge=1)
    efa_interfaces: int = Field(0, ge=0)
    neuron_devices: int = Field(0, ge=0)  # Neuron devices (accelerators_per_node counts NeuronCores)

    @model_validator(mode="after")
    def _neuron_devices_mean_trainium(self) -> InstanceType:
        # Images go by neuron_devices, launches by the accelerator's name: the two must agree.
        if (self.neuron_devices > 0) != self.accelerator.startswith("trainium"):
            raise ValueError(f"accelerator {self.accelerator!r}: neuron_devices > 0 exactly when it is a trainium")
        return self


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read YAML: {err}") from err


def load_recipe_file(path: Path) -> Recipe:
    try:
        recipe = Recipe.model_validate(_read_yaml(path))
    except ValidationError as err:
        raise RecipeError(f"{path.name}: {err}") from err
    if recipe.name != path.stem:
        raise RecipeError(f"{path.name}: name {recipe.name!r} must match the file name {path.stem!r}")
    return recipe


@functools.cache
def catalogue(recipe_dir: Path = RECIPE_DIR) -> dict[str, Recipe]:
    """Every recipe, by name. Raises on the first invalid file."""
    return {p.stem: load_recipe_file(p) for p in sorted(recipe_dir.glob("*.yaml"))}


def recipe_names(recipe_dir: Path = RECIPE_DIR) -> list[str]:
    """Recipe names from file names only: cheap enough for a DAG file's parse."""
    return sorted(p.stem for p in recipe_dir.glob("*.yaml"))


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``, reading its file only: a broken file elsewhere in the catalogue costs only itself."""
    names = recipe_names(RECIPE_DIR)
    if name not in names:
        raise RecipeError(f"recipe {name!r} does not exist; available: {', '.join(names)}")
    return _load_recipe(RECIPE_DIR / f"{name}.yaml")


@functools.cache
def _load_recipe(path: Path) -> Recipe:
    return load_recipe_file(path)


@functools.cache
def instance_types() -> dict[str, InstanceType]:
    raw = _read_yaml(INCLUDE_DIR / "instance_types.yaml")
    if not isinstance(raw, dict):
        raise RecipeError("instance_types.yaml must be a mapping of instance type to its facts")
    try:
        return {name: InstanceType.model_validate(spec) for name, spec in raw.items()}
    except ValidationError as err:
        raise RecipeError(f"instance_types.yaml: {err}") from err
