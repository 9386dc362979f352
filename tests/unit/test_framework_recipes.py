"""What DTP gives each framework of a recipe, checked without a launch: the recipes a launch template cannot honour
(``launch_problem``, ``max_steps_problem``), the model shapes Megatron-LM and NeMo are given, and neuronx-distributed's
replication of the KV heads."""

from __future__ import annotations

from pathlib import Path

from dtp.pipeline.frameworks import (
    MEGATRON_ARCHITECTURES,
    NEMO_FACTORIES,
    TEMPLATES,
    kv_replicator,
    launch_problem,
    max_steps_problem,
    template_args,
)
from dtp.recipes import catalogue, get_recipe, instance_types
from dtp.templates import render
from model import MODELS


def test_neuronx_replicates_kv_heads_only_when_tensor_ranks_outnumber_them(tmp_path: Path) -> None:
    assert [kv_replicator("llama3_1_8b", tensor) for tensor in (1, 4, 8, 16, 32)] == [1, 1, 1, 2, 4]
    recipe = get_recipe("llama3_1_8b_trn1")
    spec = {
        "recipe": recipe.model_dump() | {"parallelism": {"tensor": 8, "pipeline": 1, "context": 1}},
        "params": {"num_nodes": 1, "max_steps": 10, "checkpoint_interval": 5, "dataset_uri": "s3://datasets/n/"},
        "instance": instance_types()[recipe.defaults.instance_type].model_dump(),
    }
    context = {
        **{"num_nodes": 1, "procs_per_node": 32, "python": "python3", "omp_threads": 1, "env": {}},
        **{"exclude_nodes": "", "container": [], "enroot_login": None},
        **template_args(spec, {}, str(tmp_path), "/fsx"),
    }
    text = render(TEMPLATES["neuronx-distributed"], **context)
    assert "--tensor_parallel_size 8\n" in text and "--qkv_linear" not in text and "--kv_replicator" not in text


def test_a_neuronx_recipe_without_activation_recomputation_is_refused() -> None:
    # Without --selective_checkpoint_enabled the example trainer recomputes every layer in full.
    trn1 = get_recipe("llama3_1_8b_trn1").model_copy(update={"activation_checkpointing": False})
    assert launch_problem(trn1) == (
        "neuronx-distributed's example trainer recomputes activations, selectively or in full (it has no flag for "
        "none): set the recipe's activation_checkpointing to true"
    )


def test_mixtral_s_nemo_model_keeps_a_vocabulary_that_holds_the_mock_tokens() -> None:
    # Mixtral's 32000 tokens cannot hold GPT-2's 50257, which MockDataModule draws from.
    assert {model: factory.vocab_size for model, factory in NEMO_FACTORIES.items()} == {
        "llama3_2_1b": MODELS["llama3_2_1b"].vocab_size,
        "llama3_1_8b": MODELS["llama3_1_8b"].vocab_size,
        "llama3_1_70b": MODELS["llama3_1_70b"].vocab_size,
        "mixtral_8x7b": None,
    }


def test_nemo_recipes_bound_no_final_loss_of_their_synthetic_tokens() -> None:
    # MockDataModule's tokens are uniform over GPT-2's vocabulary: the loss cannot fall below ln(50257) ~ 10.8.
    nemo = [recipe for recipe in catalogue().values() if recipe.framework == "nemo"]
    assert nemo and all(recipe.gates.final_loss_max is None for recipe in nemo)
    assert all(recipe.gates.loss_must_decrease and recipe.gates.min_tokens_per_s for recipe in nemo)


def test_megatron_architectures_are_the_trainers_shapes() -> None:
    for name, arch in MEGATRON_ARCHITECTURES.items():
        model = MODELS[name]
        shape = {key: value for key, value in arch.items() if key not in ("rope_scaling", "tied_embeddings")}
        assert shape == {
            "num_layers": model.n_layers,
            "hidden_size": model.dim,
            "num_attention_heads": model.n_heads,
            "num_query_groups": model.n_kv_heads,
            "ffn_hidden_size": model.ffn_dim,
        }, name


def test_what_cannot_be_launched_is_named() -> None:
    tiny = get_recipe("tiny")
    assert launch_problem(tiny) is None
    nemo = tiny.model_copy(update={"framework": "nemo"})
    assert launch_problem(nemo).startswith("no nemo launch template for model 'tiny' (templated: llama3_2_1b, ")
    titan = tiny.model_copy(update={"framework": "torchtitan"})
    assert launch_problem(titan).startswith("no torchtitan launch template for model 'tiny' (templated: llama3_1_8b")


def test_a_neuronx_tensor_degree_that_cannot_replicate_the_kv_heads_evenly_is_refused() -> None:
    trn1 = get_recipe("llama3_1_8b_trn1")
    assert launch_problem(trn1) is None
    uneven = trn1.model_copy(update={"parallelism": trn1.parallelism.model_copy(update={"tensor": 12})})
    assert launch_problem(uneven) == (
        "neuronx-distributed's trainer replicates each of llama3_1_8b's 8 KV heads over the same number of "
        "tensor-parallel ranks: give a tensor degree that is a multiple of 8, not 12"
    )
    # Its launch takes the KV heads from the model's shape, which DTP has for the Llama models only.
    tiny = trn1.model_copy(update={"model": "tiny"})
    assert launch_problem(tiny).startswith("no neuronx-distributed launch template for model 'tiny'")


def test_megatron_needs_more_steps_than_the_recipe_warms_up() -> None:
    # Megatron-LM asserts the warmup ends before the last step once the job runs, after the cluster came up.
    megatron = get_recipe("llama3_1_70b_megatron")
    assert max_steps_problem(megatron, megatron.warmup_steps + 1) is None
    assert max_steps_problem(megatron, megatron.warmup_steps) == (
        "Megatron-LM requires the learning rate's warmup of recipe 'llama3_1_70b_megatron' "
        f"({megatron.warmup_steps} steps) to end before the last step: give more than {megatron.warmup_steps}"
    )
    # NeMo's scheduler stays in its warmup instead.
    assert max_steps_problem(get_recipe("llama3_1_8b_nemo"), 10) is None


def test_a_torchtitan_recipe_its_command_line_cannot_honour_is_refused() -> None:
    # torchtitan 0.3.0 takes the learning rate from its config's optimizer parameter groups, out of the CLI's reach.
    titan = get_recipe("llama3_1_8b_torchtitan")
    assert launch_problem(titan) is None
    assert launch_problem(titan.model_copy(update={"lr": 1e-4})) == (
        "torchtitan trains at its config llama3_8b's learning rate 0.0003, which its command line cannot change: "
        "set the recipe's lr to 0.0003, not 0.0001"
    )
    no_recompute = titan.model_copy(update={"activation_checkpointing": False})
    assert "set the recipe's activation_checkpointing to true" in launch_problem(no_recompute)
    seventy = titan.model_copy(update={"model": "llama3_1_70b", "lr": 1.5e-4})
    assert launch_problem(seventy) is None
