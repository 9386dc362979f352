"""Launch templates of the training frameworks DTP runs besides its own FSDP trainer.

``prepare_training`` renders ``TEMPLATES[framework]`` with the run's recipe,
parallelism and paths. Each framework's job tees its output to
``<run dir>/train.log``, which ``collect_metrics`` reads with the framework's
log parser (``dtp.metrics.framework_logs``). What each job expects on the
shared filesystem:

- ``assets/<model>/``: the Hugging Face config and tokenizer of the model,
  placed there beforehand;
- ``datasets/<framework>/<hash of dataset_uri>/``: the training data in the
  framework's format, which ``stage_data`` copies there from ``dataset_uri``
  (torchtitan: data files with a ``text`` column that ``datasets.load_dataset``
  reads from a directory, not a ``save_to_disk`` one; Megatron-LM: an indexed dataset with
  prefix ``train_text_document``; neuronx-distributed: the tokenized dataset
  its example trainer reads with ``datasets.load_from_disk``, a ``save_to_disk``
  folder; picotron: like torchtitan, data files with a ``text`` column; NeMo:
  none, its recipes train on synthetic tokens).

picotron also reads the model's safetensors from ``assets/<model>/``: it takes
the weights' shapes from them before initialising fresh ones.

The command lines follow the reference repo's test cases under
``3.test_cases/`` and the frameworks' own CLIs (torchtitan 0.3.0's config
registry and dotted overrides, Megatron-LM's ``pretrain_gpt.py`` flags,
neuronx-distributed's Llama example trainer, picotron's JSON config, NeMo 2.0's
``nemo llm pretrain`` CLI). Each framework runs from an image of its own
(``FRAMEWORK_IMAGES``: torchtitan 0.3.0, Megatron-LM core_v0.12.1, picotron at
a pinned commit and NeMo 25.07 on the GPU image's EFA/NCCL layers,
neuronx-distributed's example on the Neuron image), which ``container_build``
publishes per platform; ``validate_params`` refuses a run whose platform has
none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dtp.pipeline.s3_objects import as_folder
from dtp.recipes import Recipe

# Frameworks whose jobs read the model's Hugging Face files from ``<shared>/assets/<model>/``, placed there
# beforehand (only a shared filesystem that outlives runs can hold them), and the files ``stage_data`` requires there:
# the config, which it compares with the model's shape (neuronx-distributed and picotron take the model's shape from
# it, the others would train with another model's tokenizer), and the tokenizer's files the framework loads
# (torchtitan's HuggingFaceTokenizer, Megatron-LM's and picotron's AutoTokenizer; neuronx-distributed's trainer reads
# tokenized data).
ASSET_FILES = {
    "torchtitan": ("config.json", "tokenizer.json", "tokenizer_config.json"),
    "megatron-lm": ("config.json", "tokenizer.json", "tokenizer_config.json"),
    "neuronx-distributed": ("config.json",),
    "picotron": ("config.json", "tokenizer.json", "tokenizer_config.json"),
}
NEEDS_ASSETS = frozenset(ASSET_FILES)
TEMPLATES = {
    "fsdp": "slurm/train.sbatch.j2",
    "torchtitan": "slurm/train_torchtitan.sbatch.j2",
    "megatron-lm": "slurm/train_megatron.sbatch.j2",
    "neuronx-distributed": "slurm/train_neuronx.sbatch.j2",
    "picotron": "slurm/train_picotron.sbatch.j2",
    "nemo": "slurm/train_nemo.sbatch.j2",
}


@dataclass(frozen=True)
class TorchtitanConfig:
    """A torchtitan config registry entry (``--module``, ``--config``) and its learning rate, which torchtitan
    0.3.0's command line cannot change (it is in the optimizer's parameter groups). Every entry here recomputes
    activations (selective or full), and DTP's launch keeps that."""

    module: str
    config: str
    lr: float


# torchtitan's config registry entries for DTP's model names (torchtitan/models/llama3/config_registry.py).
TORCHTITAN_CONFIGS = {
    "llama3_1_8b": TorchtitanConfig("llama3", "llama3_8b", lr=3e-4),
    "llama3_1_70b": TorchtitanConfig("llama3", "llama3_70b", lr=1.5e-4),
}
# Megatron-LM architecture flags for DTP's model names (the trainer's shapes in include/training/model.py); the
# neuronx-distributed launch takes the model's KV heads from them. Besides the shapes, as the Hugging Face models
# have them: Llama 3.1's RoPE scaling (``--use-rope-scaling``, whose factor 8 is Megatron's default: core_v0.12.1's
# pretrain_gpt.py does not pass ``--rope-scaling-factor`` on, so Llama 3.2's 32 cannot be given and it goes
# unscaled), and Llama 3.2 1B's output layer, which shares the embedding's weights.
MEGATRON_ARCHITECTURES = {
    "llama3_2_1b": {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 8,
                    "ffn_hidden_size": 8192, "rope_scaling": False, "tied_embeddings": True},
    "llama3_1_8b": {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_query_groups": 8,
                    "ffn_hidden_size": 14336, "rope_scaling": True, "tied_embeddings": False},
    "llama3_1_70b": {"num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "num_query_groups": 8,
                     "ffn_hidden_size": 28672, "rope_scaling": True, "tied_embeddings": False},
}  # fmt: skip


@dataclass(frozen=True)
class NemoFactory:
    """A NeMo 2.0 pretraining recipe (``--factory``) and the vocabulary its model is given. The recipes train on
    MockDataModule's tokens, drawn from GPT-2's 50257-token vocabulary, and without a size of its own the model
    takes that tokenizer's (padded to 50304): ``vocab_size`` gives it the model's own, where that holds every mock
    token (None: NeMo's)."""

    factory: str
    vocab_size: int | None


# NeMo 2.0's pretraining recipes for DTP's model names. Mixtral's 32000 tokens cannot hold GPT-2's 50257.
NEMO_FACTORIES = {
    "llama3_2_1b": NemoFactory("llama32_1b", vocab_size=128256),
    "llama3_1_8b": NemoFactory("llama31_8b", vocab_size=128256),
    "llama3_1_70b": NemoFactory("llama31_70b", vocab_size=128256),
    "mixtral_8x7b": NemoFactory("mixtral_8x7b", vocab_size=None),
}
# picotron tokenises every document of its dataset before the first step unless its config bounds how many
# (``num_samples``): DTP bounds them by the run's tokens, counting documents of at least this many tokens.
PICOTRON_MIN_DOCUMENT_TOKENS = 128
# The files at the root of a folder that ``datasets``' ``Dataset.save_to_disk`` wrote, which ``load_from_disk`` reads.
SAVE_TO_DISK_FILES = ("state.json", "dataset_info.json")
# Frameworks that train on a dataset prepared in their own format, and the files it must hold.
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "torchtitan": (),
    "megatron-lm": ("train_text_document.bin", "train_text_document.idx"),
    "neuronx-distributed": SAVE_TO_DISK_FILES,
    "picotron": (),
}
# The format each of them reads, as a dataset_uri refused for it names it.
DATASET_FORMATS = {
    "torchtitan": "data files with a text column, which datasets.load_dataset reads: not a save_to_disk folder",
    "megatron-lm": "an indexed dataset with prefix train_text_document",
    "neuronx-distributed": "a folder that datasets' save_to_disk wrote, which its trainer's load_from_disk reads",
    "picotron": "data files with a text column, which datasets.load_dataset reads: not a save_to_disk folder",
}
# Frameworks whose jobs read the dataset with ``datasets.load_dataset(dir, split="train")``, which raises on a folder
# that save_to_disk wrote (its state.json at the root).
LOADS_DATA_FILES = frozenset({"torchtitan", "picotron"})
# The vocabulary of the models in MEGATRON_ARCHITECTURES (include/training/model.py's ``vocab_size``, whose torch the
# Airflow components do not have): Llama 3's tokenizer.
VOCABULARY_SIZES = {"llama3_2_1b": 128256, "llama3_1_8b": 128256, "llama3_1_70b": 128256}
# Frameworks whose launch names the model's shape: only the models they have one for can be launched.
_MODELS_BY_FRAMEWORK: dict[str, dict[str, Any]] = {
    "torchtitan": TORCHTITAN_CONFIGS,
    "megatron-lm": MEGATRON_ARCHITECTURES,
    "nemo": NEMO_FACTORIES,
    "neuronx-distributed": MEGATRON_ARCHITECTURES,
}


@dataclass(frozen=True)
class FrameworkImage:
    """The image a framework's jobs run in (a ``container_build`` image, built at the framework's stage of its
    Dockerfile in images/containers) and where the framework is in it: runtime keys its launch template reads,
    ``python`` where its interpreter is not the image's ``python3``."""

    image: str
    layout: Mapping[str, str]


# Every framework but DTP's own trainer runs from an image of its own, published per platform.
FRAMEWORK_IMAGES = {
    "torchtitan": FrameworkImage("torchtitan", {"python": "/opt/torchtitan/bin/python"}),
    "megatron-lm": FrameworkImage("megatron-lm", {"megatron_dir": "/workspace/Megatron-LM"}),
    "neuronx-distributed": FrameworkImage(
        "neuronx-distributed", {"neuronx_trainer": "/workspace/neuronx-distributed/llama/tp_zero1_llama_hf_pretrain.py"}
    ),
    "picotron": FrameworkImage("picotron", {"picotron_trainer": "/picotron/train.py"}),
    "nemo": FrameworkImage("nemo", {"nemo_cli": "nemo"}),
}


def image_path(images: dict[str, Any], framework: str, key: str) -> str:
    """``key`` of the runtime ``images`` (``resolve_images`` adds the framework image's layout), else where the
    framework's image puts it."""
    return str(images.get(key) or FRAMEWORK_IMAGES[framework].layout[key])


def launch_problem(recipe: Recipe) -> str | None:
    """Why DTP cannot launch ``recipe`` (no template for its framework, or for its model there), else None."""
    if recipe.framework not in TEMPLATES:
        return f"framework {recipe.framework!r} has no launch template (launchable: {', '.join(TEMPLATES)})"
    models = _MODELS_BY_FRAMEWORK.get(recipe.framework)
    if models is not None and recipe.model not in models:
        return f"no {recipe.framework} launch template for model {recipe.model!r} (templated: {', '.join(models)})"
    if recipe.framework == "torchtitan":
        titan = TORCHTITAN_CONFIGS[recipe.model]
        if recipe.lr != titan.lr:
            return (
                f"torchtitan trains at its config {titan.config}'s learning rate {titan.lr:g}, which its command "
                f"line cannot change: set the recipe's lr to {titan.lr:g}, not {recipe.lr:g}"
            )
        if not recipe.activation_checkpointing:
            return (
                f"torchtitan's config {titan.config} recomputes activations, and DTP's launch keeps that: set the "
                "recipe's activation_checkpointing to true"
            )
    if recipe.framework == "neuronx-distributed":
        if not recipe.activation_checkpointing:
            return (
                "neuronx-distributed's example trainer recomputes activations, selectively or in full (it has no "
                "flag for none): set the recipe's activation_checkpointing to true"
            )
        kv_heads, tensor = MEGATRON_ARCHITECTURES[recipe.model]["num_query_groups"], recipe.parallelism.tensor
        if tensor > kv_heads and tensor % kv_heads:
            return (
                f"neuronx-distributed's trainer replicates each of {recipe.model}'s {kv_heads} KV heads over the same "
                f"number of tensor-parallel ranks: give a tensor degree that is a multiple of {kv_heads}, not {tensor}"
            )
    return None


def max_steps_problem(recipe: Recipe, max_steps: int) -> str | None:
    """Why ``recipe``'s framework cannot train it for ``max_steps`` steps, else None. Megatron-LM asserts, once the
    job runs, that the learning rate's warmup ends before its decay does, at the last step."""
    if recipe.framework == "megatron-lm" and max_steps <= recipe.warmup_steps:
        return (
            f"Megatron-LM requires the learning rate's warmup of recipe {recipe.name!r} ({recipe.warmup_steps} "
            f"steps) to end before the last step: give more than {recipe.warmup_steps}"
        )
    return None


def kv_replicator(model: str, tensor: int) -> int:
    """Over how many tensor-parallel ranks neuronx-distributed's Llama trainer replicates each of ``model``'s KV
    heads (``--kv_replicator``): 1 while every rank can hold heads of its own."""
    return max(1, tensor // MEGATRON_ARCHITECTURES[model]["num_query_groups"])


def datasets_cache_dir(mirror: str) -> str:
    """Where the jobs that read the mirror at ``mirror`` with ``datasets.load_dataset`` keep datasets' cache (its
    Arrow copy of the dataset, its map results): beside the mirror, whose stale-file removal would delete it inside."""
    return f"{mirror}.hf_datasets_cache"


def dataset_dir(shared_dir: str, framework: str, dataset_uri: str) -> str:
    """Where a framework's job reads its dataset on the shared filesystem: one directory per source, so runs of
    other datasets never overwrite it and runs of the same one reuse it (``s3://b/ds`` and ``s3://b/ds/`` are one
    source, the folder ``ds/``)."""
    source = as_folder(dataset_uri)
    return f"{shared_dir}/datasets/{framework}/{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def dataset_files_problem(framework: str, has_file: Callable[[str], bool]) -> str | None:
    """Why a dataset folder cannot be ``framework``'s, judged by the files at its root (``has_file`` tells whether
    one of that name is there): files the framework reads missing, or a folder that save_to_disk wrote where the
    framework reads data files with ``datasets.load_dataset``; else None."""
    reads = f"{framework} reads {DATASET_FORMATS[framework]}"
    if missing := [name for name in DATASET_FILES[framework] if not has_file(name)]:
        return f"lacks {', '.join(missing)} ({reads}: {', '.join(DATASET_FILES[framework])})"
    state = SAVE_TO_DISK_FILES[0]
    if framework in LOADS_DATA_FILES and has_file(state):
        return f"holds {state}, so it is a folder that save_to_disk wrote ({reads})"
    return None


def hf_config_shape(model: str) -> dict[str, int]:
    """The fields of a Hugging Face ``config.json`` that give ``model``'s shape, as DTP launches it; empty for a
    model DTP has no shape of its own for (the framework takes it from the config)."""
    if model not in MEGATRON_ARCHITECTURES:
        return {}
    architecture = MEGATRON_ARCHITECTURES[model]
    return {
        "vocab_size": VOCABULARY_SIZES[model],
        "hidden_size": architecture["hidden_size"],
        "num_hidden_layers": architecture["num_layers"],
        "num_attention_heads": architecture["num_attention_heads"],
        "num_key_value_heads": architecture["num_query_groups"],
        "intermediate_size": architecture["ffn_hidden_size"],
    }


def template_args(spec: dict[str, Any], images: dict[str, Any], workdir: str, shared_dir: str) -> dict[str, Any]:
    """What ``TEMPLATES[framework]`` needs, besides the arguments every job template takes."""
    recipe, params = spec["recipe"], spec["params"]
    framework, model = recipe["framework"], recipe["model"]
    args = {
        "workdir": workdir,
        "log_path": f"{workdir}/train.log",
        "checkpoint_dir": f"{workdir}/checkpoints",
        "assets_dir": f"{shared_dir}/assets/{model}",
        "dataset_dir": dataset_dir(shared_dir, framework, params["dataset_uri"]),
        "recipe": recipe,
        "parallelism": recipe["parallelism"],
        "max_steps": params["max_steps"],
        "checkpoint_interval": params["checkpoint_interval"],
    }
    validated = Recipe.model_validate(recipe)
    micro_batches = validated.micro_batches_per_step
    # Hugging Face datasets' cache for the jobs that read the mirror with load_dataset, which writes an Arrow copy of
    # it there (picotron its tokenized copy too): on the shared filesystem beside the mirror, not in it (its stale-file
    # removal would delete it), nor in ~/.cache (the head node's /home, a container's root file system).
    datasets_cache = datasets_cache_dir(args["dataset_dir"])
    if framework == "torchtitan" and model in TORCHTITAN_CONFIGS:
        titan = TORCHTITAN_CONFIGS[model]
        mixed_precision = "float32" if recipe["precision"] == "fp32" else "bfloat16"
        return {
            **args,
            "module": titan.module,
            "config": titan.config,
            "mixed_precision": mixed_precision,
            # A replica's batch, which torchtitan's pipeline splits into micro-batches of the recipe's size.
            "local_batch": recipe["micro_batch"] * micro_batches,
            "datasets_cache": datasets_cache,
        }
    _, replicas = validated.ranks(params["num_nodes"], spec["instance"]["accelerators_per_node"])
    global_batch = replicas * recipe["micro_batch"] * micro_batches
    if framework == "megatron-lm" and model in MEGATRON_ARCHITECTURES:
        return {
            **args,
            "architecture": MEGATRON_ARCHITECTURES[model],
            "global_batch": global_batch,
            "megatron_dir": image_path(images, framework, "megatron_dir"),
        }
    if framework == "neuronx-distributed" and model in MEGATRON_ARCHITECTURES:
        return {
            **args,
            "trainer": image_path(images, framework, "neuronx_trainer"),
            "compile_cache": f"{shared_dir}/neuron_cache",
            "kv_replicator": kv_replicator(model, recipe["parallelism"]["tensor"]),
        }
    if framework == "nemo" and model in NEMO_FACTORIES:
        # No assets or dataset: NeMo's recipes bring their tokenizer and train on synthetic tokens.
        unused = ("assets_dir", "dataset_dir")
        return {
            **{key: value for key, value in args.items() if key not in unused},
            "factory": NEMO_FACTORIES[model].factory,
            "vocab_size": NEMO_FACTORIES[model].vocab_size,
            "global_batch": global_batch,
            "nemo": image_path(images, framework, "nemo_cli"),
        }
    if framework == "picotron":
        # The rest of the run's settings reach picotron through its config file.
        return {
            **{key: args[key] for key in ("workdir", "log_path", "checkpoint_dir", "assets_dir", "parallelism")},
            "config_json": json.dumps(picotron_config(args, replicas, micro_batches)),
            "trainer": image_path(images, framework, "picotron_trainer"),
            "datasets_cache": datasets_cache,
        }
    raise ValueError(f"no {framework} launch template for model {model!r}")  # validate_params refuses these first


def picotron_config(args: dict[str, Any], replicas: int, micro_batches: int) -> dict[str, Any]:
    """picotron's train.py config (the layout its create_config.py writes) for the run, each replica training on
    ``micro_batches`` micro-batches a step; ``load_path`` is left empty for the job to point at the newest
    checkpoint."""
    recipe, parallelism = args["recipe"], args["parallelism"]
    sequences = args["max_steps"] * replicas * micro_batches * recipe["micro_batch"]
    # Documents enough for the run's tokens (picotron concatenates them, then cuts sequences of seq_len + 1).
    documents = sequences * -(-(recipe["seq_len"] + 1) // PICOTRON_MIN_DOCUMENT_TOKENS)
    return {
        "distributed": {
            "tp_size": parallelism["tensor"],
            "cp_size": parallelism["context"],
            "pp_size": parallelism["pipeline"],
            "dp_size": replicas,
            "pp_engine": "1f1b",
            "backend": "nccl",
            "use_cpu": False,
        },
        # A local directory as the model's name: its config, tokenizer and (for picotron's download check) itself.
        "model": {"name": args["assets_dir"], "use_fused_adam": True},
        "training": {
            "seed": 42,
            "learning_rate": recipe["lr"],
            "total_train_steps": args["max_steps"],
            "seq_length": recipe["seq_len"],
            "micro_batch_size": recipe["micro_batch"],
            "gradient_accumulation_steps": micro_batches,
            "num_samples": documents,
            "max_tokens": None,
        },
        "dataset": {
            "name": args["dataset_dir"],
            "subset_name": None,
            "split": "train",
            "num_workers": 0,
            "num_proc": 1,
        },
        "checkpoint": {
            "save_dir": args["checkpoint_dir"],
            "save_frequency": args["checkpoint_interval"],
            "load_path": "",
        },
        "logging": {"use_wandb": False, "project_name": "dtp", "run_name": recipe["name"]},
        "environment": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "FLASH_ATTEN": "1"},
    }
