"""dtp.recipes: the shipped catalogue loads, and a broken recipe file raises RecipeError naming the file."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from dtp import recipes
from dtp.params import TrainParams
from dtp.pipeline.data import SAMPLE_CORPUS
from dtp.pipeline.jobs import training_config
from dtp.recipes import (
    PLATFORMS,
    RECIPE_DIR,
    InstanceType,
    Recipe,
    RecipeError,
    catalogue,
    get_recipe,
    instance_types,
    load_recipe_file,
    recipe_names,
)
from model import MODELS
from train import TrainConfig

SHIPPED = sorted(RECIPE_DIR.glob("*.yaml"))


def test_shipped_recipes_exist() -> None:
    assert {p.stem for p in SHIPPED} >= {"tiny", "llama3_2_1b", "llama3_1_8b", "llama3_1_70b"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_loads_and_is_consistent(path: Path) -> None:
    recipe = catalogue()[path.stem]
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem
    assert recipe == load_recipe_file(path)
    # Everything a recipe points at exists: its model shape, its default instance type on its default platform.
    assert recipe.model in MODELS
    instance = instance_types()[recipe.defaults.instance_type]
    assert recipe.defaults.platform in instance.platforms
    # A capacity fallback keeps the node's shape, so the recipe's split and preflight still hold on it.
    for fallback in recipe.defaults.fallback_instance_types:
        other = instance_types()[fallback]
        assert (other.accelerators_per_node, other.collective_test) == (
            instance.accelerators_per_node,
            instance.collective_test,
        ), fallback
    assert recipe.defaults.checkpoint_interval <= recipe.defaults.max_steps
    assert recipe.warmup_steps < recipe.defaults.max_steps
    # The throughput gate is reachable at the recipe's own expected pace on its default nodes.
    tokens = recipe.tokens_per_step(recipe.defaults.num_nodes, instance.accelerators_per_node)
    if recipe.gates.min_tokens_per_s:
        assert tokens / recipe.expected_step_seconds >= recipe.gates.min_tokens_per_s


def test_model_parallelism_must_divide_the_accelerators(tiny_raw: dict) -> None:
    recipe = Recipe.model_validate(
        {**tiny_raw, "framework": "megatron-lm", "parallelism": {"tensor": 8, "pipeline": 2}}
    )
    assert recipe.ranks(num_nodes=2, accelerators_per_node=8) == (16, 1)
    # 2 replicas, each 4 micro-batches of 16 sequences per pipeline stage a step.
    assert recipe.micro_batches_per_step == 8
    assert recipe.tokens_per_step(num_nodes=4, accelerators_per_node=8) == 2 * 8 * 16 * 128
    with pytest.raises(RecipeError, match=r"splits the model over 16 accelerators .* does not divide 8"):
        recipe.ranks(num_nodes=1, accelerators_per_node=8)


def test_a_step_without_a_pipeline_is_one_micro_batch_per_replica(tiny_raw: dict) -> None:
    recipe = Recipe.model_validate({**tiny_raw, "framework": "megatron-lm", "parallelism": {"tensor": 8}})
    assert recipe.micro_batches_per_step == 1
    assert recipe.tokens_per_step(num_nodes=4, accelerators_per_node=8) == 4 * 16 * 128


def test_70b_recipes_checkpoint_at_most_twice_a_default_run() -> None:
    # A 70B checkpoint is about a terabyte of weights and optimizer state.
    seventy = [recipe for recipe in catalogue().values() if recipe.model == "llama3_1_70b"]
    assert len(seventy) >= 2 and all(recipe.defaults.checkpoint_interval >= 500 for recipe in seventy)


def byte_unigram_entropy(text: bytes) -> float:
    """The entropy, in nats, of the bytes of ``text`` drawn one at a time by their frequencies in it."""
    return -sum(n / len(text) * math.log(n / len(text)) for n in Counter(text).values())


# The low end of English text's byte unigram entropy (4.1-4.5 bits), in nats.
ENGLISH_BYTE_UNIGRAM_NATS = 4.1 * math.log(2)


@pytest.mark.parametrize("name", [name for name, recipe in catalogue().items() if recipe.framework == "fsdp"])
def test_the_trainers_loss_bound_needs_more_than_byte_frequencies(name: str) -> None:
    # DTP's trainer trains on bytes: predicting each by its frequency alone scores the unigram entropy.
    bound = catalogue()[name].gates.final_loss_max
    assert bound is not None
    assert bound < math.log(256)
    assert bound < byte_unigram_entropy(SAMPLE_CORPUS.read_bytes()) and bound < ENGLISH_BYTE_UNIGRAM_NATS


def test_fsdp_trainer_has_no_tensor_parallelism(tiny_raw: dict) -> None:
    with pytest.raises(ValueError, match="framework 'fsdp' has no pipeline/tensor parallelism"):
        Recipe.model_validate({**tiny_raw, "parallelism": {"tensor": 2, "pipeline": 2}})


def test_catalogue_and_recipe_names_agree() -> None:
    assert list(catalogue()) == recipe_names() == [p.stem for p in SHIPPED]


def test_get_recipe() -> None:
    assert get_recipe("tiny").model == "tiny"
    with pytest.raises(RecipeError, match=r"recipe 'nope' does not exist; available: .*tiny"):
        get_recipe("nope")


def test_instance_types_load() -> None:
    types = instance_types()
    assert "local.cpu" in types and "p5.48xlarge" in types
    assert types["local.cpu"].platforms == ["local"]
    assert types["local.cpu"].price_usd_per_hour == 0.0
    for name, spec in types.items():
        assert set(spec.platforms) <= set(PLATFORMS), name
        assert spec.expected_busbw_gbps > 0, name
        assert spec.accelerators_per_node >= 1, name


@pytest.mark.parametrize(("accelerator", "neuron_devices"), [("trainium1", 0), ("H100", 16)])
def test_an_instance_type_has_neuron_devices_exactly_when_it_is_a_trainium(accelerator, neuron_devices) -> None:
    entry = instance_types()["trn1.32xlarge"].model_dump() | {
        "accelerator": accelerator,
        "neuron_devices": neuron_devices,
    }
    with pytest.raises(ValueError, match="neuron_devices > 0 exactly when it is a trainium"):
        InstanceType.model_validate(entry)


def test_recipe_names_reads_file_names_only(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("not: [valid")
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert recipe_names(tmp_path) == ["a", "b"]


# --- broken files ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_raw() -> dict:
    return yaml.safe_load((RECIPE_DIR / "tiny.yaml").read_text())


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_copy_of_a_valid_recipe_loads(tmp_path: Path, tiny_raw: dict) -> None:
    assert load_recipe_file(write(tmp_path, "tiny", tiny_raw)) == get_recipe("tiny")


def test_broken_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "broken", "name: broken\ndefaults: [unclosed\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml: cannot read YAML"):
        load_recipe_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"absent\.yaml: cannot read YAML"):
        load_recipe_file(tmp_path / "absent.yaml")


@pytest.mark.parametrize("content", ["", "- a list\n", "just a string\n", "42\n"])
def test_not_a_mapping(tmp_path: Path, content: str) -> None:
    with pytest.raises(RecipeError, match=r"^odd\.yaml: "):
        load_recipe_file(write(tmp_path, "odd", content))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lr": -1}, "lr"),
        ({"seq_len": 4}, "seq_len"),
        ({"framework": "jax"}, "framework"),
        ({"precision": "fp16"}, "precision"),
        ({"framework": "torchtitan", "compile": True}, "compile is DTP's trainer's option"),
        ({"precision": "fp8"}, "precision fp8 is launched for framework megatron-lm only, not 'fsdp'"),
        ({"learning_rate": 1e-3}, "learning_rate"),
        ({"defaults": {"platform": "local"}}, "defaults.instance_type"),
        ({"gates": {"final_loss_max": "low"}}, "gates.final_loss_max"),
        ({"gates": {"unknown_gate": 1}}, "gates.unknown_gate"),
        ({"gates": {"history_runs": 2, "min_history_runs": 3}}, "min_history_runs (3) must be at most history_runs"),
    ],
)
def test_wrong_field(tmp_path: Path, tiny_raw: dict, change: dict, field: str) -> None:
    path = write(tmp_path, "tiny", {**tiny_raw, **change})
    with pytest.raises(RecipeError) as info:
        load_recipe_file(path)
    assert str(info.value).startswith("tiny.yaml: ")
    assert field in str(info.value)


def test_missing_field(tmp_path: Path, tiny_raw: dict) -> None:
    del tiny_raw["expected_step_seconds"]
    with pytest.raises(RecipeError, match=r"(?s)^tiny\.yaml: .*expected_step_seconds"):
        load_recipe_file(write(tmp_path, "tiny", tiny_raw))


def test_name_must_match_file_name(tmp_path: Path, tiny_raw: dict) -> None:
    path = write(tmp_path, "other", tiny_raw)
    with pytest.raises(RecipeError, match=r"other\.yaml: name 'tiny' must match the file name 'other'"):
        load_recipe_file(path)


def test_invalid_name_pattern(tmp_path: Path, tiny_raw: dict) -> None:
    path = write(tmp_path, "Bad-Name", {**tiny_raw, "name": "Bad-Name"})
    with pytest.raises(RecipeError, match=r"(?s)^Bad-Name\.yaml: .*name"):
        load_recipe_file(path)


def test_catalogue_raises_on_the_first_broken_file(tmp_path: Path, tiny_raw: dict) -> None:
    write(tmp_path, "tiny", tiny_raw)
    write(tmp_path, "zzz", {**tiny_raw, "name": "zzz", "micro_batch": 0})
    with pytest.raises(RecipeError, match=r"(?s)^zzz\.yaml: .*micro_batch"):
        catalogue(tmp_path)


def test_catalogue_of_a_directory(tmp_path: Path, tiny_raw: dict) -> None:
    write(tmp_path, "tiny", tiny_raw)
    write(tmp_path, "tiny2", {**tiny_raw, "name": "tiny2", "seq_len": 64})
    recipes = catalogue(tmp_path)
    assert list(recipes) == ["tiny", "tiny2"]
    assert recipes["tiny2"].seq_len == 64


@pytest.mark.parametrize("compile_", [False, True])
def test_the_trainer_gets_the_recipes_compile_and_activation_checkpointing(compile_: bool) -> None:
    recipe = load_recipe_file(RECIPE_DIR / "llama3_1_8b.yaml").model_copy(update={"compile": compile_})
    spec = {"recipe": recipe.model_dump(), "params": TrainParams().model_dump(), "names": {"run_key": "r"}}
    instance = instance_types()["p5.48xlarge"].model_dump()
    config = training_config(spec, recipe, "/fsx/runs/r", {"train_bin": "/fsx/runs/r/train.bin"}, instance)
    assert (config["compile"], config["activation_checkpointing"]) == (compile_, True)
    assert config["peak_flops"] == 989e12  # the instance type's, for MFU
    assert config["device"] == "cuda"  # a GPU node whose torch cannot use CUDA fails instead of training on CPUs
    assert config["stop_check_steps"] == 3  # SIGTERM agreed on about every 5 s: 1.5 s steps
    assert config.keys() <= {f.name for f in fields(TrainConfig)}


def test_a_broken_recipe_file_costs_only_its_own_runs(tmp_path, monkeypatch) -> None:
    shutil.copy(RECIPE_DIR / "tiny.yaml", tmp_path / "tiny.yaml")
    (tmp_path / "broken.yaml").write_text("name: broken\nframework: [unclosed\n")
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path)
    assert recipes.get_recipe("tiny").name == "tiny"
    with pytest.raises(RecipeError, match=r"broken\.yaml: cannot read YAML"):
        recipes.get_recipe("broken")
    with pytest.raises(RecipeError, match="recipe 'tiny_deep' does not exist; available: broken, tiny"):
        recipes.get_recipe("tiny_deep")
