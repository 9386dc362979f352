"""Launch templates of the training frameworks DTP runs besides its own FSDP trainer.

``prepare_training`` renders ``TEMPLATES[framework]`` with the run's recipe,
parallelism and paths. Each framework's job tees its output to
``<run dir>/train.log``, which ``collect_metrics`` reads with the framework's
log parser (``dtp.metrics.framework_logs``). What each job expects on the
shared filesystem, staged beforehand:

- ``assets/<model>/``: the Hugging Face config and tokenizer of the model;
- ``datasets/<framework>/<model>/``: the training data in the framework's
  format (torchtitan: a Hugging Face dataset name or path in ``dataset``;
  Megatron-LM: an indexed dataset with prefix ``train_text_document``;
  neuronx-distributed: the tokenized dataset its example trainer reads).

The command lines follow the reference repo's test cases under
``3.test_cases/`` and the frameworks' own CLIs (torchtitan 0.3.0's config
registry and dotted overrides, Megatron-LM's ``pretrain_gpt.py`` flags,
neuronx-distributed's Llama example trainer).
"""

from __future__ import annotations

from typing import Any

from dtp.recipes import Recipe

TEMPLATES = {
    "fsdp": "slurm/train.sbatch.j2",
    "torchtitan": "slurm/train_torchtitan.sbatch.j2",
    "megatron-lm": "slurm/train_megatron.sbatch.j2",
    "neuronx-distributed": "slurm/train_neuronx.sbatch.j2",
}
# torchtitan's config registry entries (``--module``, ``--config``) for DTP's model names.
TORCHTITAN_CONFIGS = {
    "llama3_1_8b": ("llama3", "llama3_8b"),
    "llama3_1_70b": ("llama3", "llama3_70b"),
}
# Megatron-LM architecture flags for DTP's model names (the trainer's shapes in include/training/model.py).
MEGATRON_ARCHITECTURES = {
    "llama3_2_1b": {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 8,
                    "ffn_hidden_size": 8192},
    "llama3_1_8b": {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_query_groups": 8,
                    "ffn_hidden_size": 14336},
    "llama3_1_70b": {"num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "num_query_groups": 8,
                     "ffn_hidden_size": 28672},
}  # fmt: skip
# Frameworks whose launch names the model's shape: only the models they have one for can be launched.
_MODELS_BY_FRAMEWORK: dict[str, dict[str, Any]] = {
    "torchtitan": TORCHTITAN_CONFIGS,
    "megatron-lm": MEGATRON_ARCHITECTURES,
}
# Where the framework's code is inside its image, unless the image says otherwise.
MEGATRON_DIR = "/workspace/Megatron-LM"
NEURONX_TRAINER = "/workspace/neuronx-distributed/llama/train.py"


def launch_problem(recipe: Recipe) -> str | None:
    """Why DTP cannot launch ``recipe`` (no template for its framework, or for its model there), else None."""
    if recipe.framework not in TEMPLATES:
        return f"framework {recipe.framework!r} has no launch template (launchable: {', '.join(TEMPLATES)})"
    models = _MODELS_BY_FRAMEWORK.get(recipe.framework)
    if models is not None and recipe.model not in models:
        return f"no {recipe.framework} launch template for model {recipe.model!r} (templated: {', '.join(models)})"
    return None


def template_args(spec: dict[str, Any], images: dict[str, Any], workdir: str, shared_dir: str) -> dict[str, Any]:
    """What ``TEMPLATES[framework]`` needs, besides the arguments every job template takes."""
    recipe, params = spec["recipe"], spec["params"]
    framework, model = recipe["framework"], recipe["model"]
    args = {
        "workdir": workdir,
        "log_path": f"{workdir}/train.log",
        "checkpoint_dir": f"{workdir}/checkpoints",
        "assets_dir": f"{shared_dir}/assets/{model}",
        "dataset_dir": f"{shared_dir}/datasets/{framework}/{model}",
        "recipe": recipe,
        "parallelism": recipe["parallelism"],
        "max_steps": params["max_steps"],
        "checkpoint_interval": params["checkpoint_interval"],
    }
    if framework == "torchtitan" and model in TORCHTITAN_CONFIGS:
        module, config = TORCHTITAN_CONFIGS[model]
        return {**args, "module": module, "config": config}
    if framework == "megatron-lm" and model in MEGATRON_ARCHITECTURES:
        _, replicas = Recipe.model_validate(recipe).ranks(
            params["num_nodes"], spec["instance"]["accelerators_per_node"]
        )
        return {
            **args,
            "architecture": MEGATRON_ARCHITECTURES[model],
            "global_batch": replicas * recipe["micro_batch"],
            "megatron_dir": images.get("megatron_dir", MEGATRON_DIR),
        }
    if framework == "neuronx-distributed":
        return {
            **args,
            "trainer": images.get("neuronx_trainer", NEURONX_TRAINER),
            "compile_cache": f"{shared_dir}/neuron_cache",
        }
    raise ValueError(f"no {framework} launch template for model {model!r}")  # validate_params refuses these first
