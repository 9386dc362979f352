"""Launch templates of torchtitan, Megatron-LM, neuronx-distributed, picotron and NeMo: each whole batch script
runs against stand-in ``scontrol``/``srun`` that record the launch and print the framework's log lines, which must
come back through the run's train.log and the framework's parser."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from templates_support import framework_spec

from dtp.metrics.framework_logs import summarize_log
from dtp.pipeline.frameworks import TEMPLATES, dataset_dir, template_args
from dtp.recipes import Recipe, get_recipe
from dtp.templates import render

LOGS = Path(__file__).parent / "data" / "framework_logs"
SAMPLE_LOG = {
    "torchtitan": "torchtitan_llama3_8b.log",
    "megatron-lm": "megatron_llama3_8b.log",
    "neuronx-distributed": "neuronx_llama3_8b.log",
    "picotron": "picotron_llama3_2_1b.log",
    "nemo": "nemo_llama3_8b.log",
}


def _launch(
    tmp_path: Path,
    recipe_name: str,
    checkpoints: dict[str, dict[str, bytes]] | None = None,
    extra_env: dict[str, str] | None = None,
    checkpoint_files: dict[str, bytes] | None = None,
    **recipe_updates: Any,
) -> tuple[list[list[str]], dict[str, Any], Recipe]:
    """Run the recipe's batch script (the recipe's fields changed by ``recipe_updates``); return each srun call's
    argv, the template context and the recipe. ``checkpoints`` are folders made in the run's checkpoint folder
    first, with their files' contents, and ``checkpoint_files`` files made there. The environment of the last
    srun call is left in ``srun.env`` under ``tmp_path``."""
    recipe = Recipe.model_validate(get_recipe(recipe_name).model_dump() | recipe_updates)
    spec = framework_spec(recipe)
    workdir = tmp_path / "run"
    workdir.mkdir()
    common = {
        "num_nodes": recipe.defaults.num_nodes,
        "procs_per_node": spec["instance"]["accelerators_per_node"],
        "python": "/opt/venv/bin/python",
        "omp_threads": 8,
        "env": extra_env or {},
        "exclude_nodes": "",
        "container": [],
        "enroot_login": None,
    }
    context = {**common, **template_args(spec, {}, str(workdir), str(tmp_path / "fsx"))}
    checkpoint_dir = Path(context["checkpoint_dir"])
    for step, files in (checkpoints or {}).items():
        (checkpoint_dir / step).mkdir(parents=True)
        for name, content in files.items():
            (checkpoint_dir / step / name).write_bytes(content)
    for name, content in (checkpoint_files or {}).items():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / name).write_bytes(content)
    script = tmp_path / "train.sbatch"
    script.write_text(render(TEMPLATES[recipe.framework], **context))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$2" = hostnames ]; then echo n1; else echo "NodeName=n1 NodeAddr=10.0.0.7 State=IDLE"; fi\n'
    )
    calls = tmp_path / "srun.calls"
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\nprintf '%s\\0' \"$@\" >> {calls}\necho >> {calls}\nenv > {tmp_path / 'srun.env'}\n"
        f"cat {LOGS / SAMPLE_LOG[recipe.framework]}\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.defpath}", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "77", "SLURM_NNODES": "4"}
    job = subprocess.run(["bash", str(script)], env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (tmp_path / "job.out").write_bytes(job.stdout)  # what Slurm writes to the job's output file
    argvs = [call.split("\0") for call in calls.read_text().split("\0\n") if call]
    return argvs, context, recipe


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_torchtitan_launch(tmp_path: Path) -> None:
    (argv,), context, _ = _launch(tmp_path, "llama3_1_8b_torchtitan")
    assert argv[argv.index("-m", argv.index("torch.distributed.run")) + 1] == "torchtitan.train"
    assert (_flag(argv, "--module"), _flag(argv, "--config")) == ("llama3", "llama3_8b")
    assert "--nproc_per_node=8" in argv and _flag(argv, "--training.steps") == "100"
    assert _flag(argv, "--training.seq_len") == "8192" and _flag(argv, "--parallelism.tensor_parallel_degree") == "1"
    assert _flag(argv, "--checkpoint.folder") == context["checkpoint_dir"] and "--checkpoint.enable" in argv
    assert "--rdzv_endpoint=10.0.0.7:29500" in argv
    assert _flag(argv, "--training.mixed_precision_param") == "bfloat16"
    assert _flag(argv, "--lr_scheduler.warmup_steps") == "200"
    # --dataloader.dataset names one of torchtitan's registered datasets: c4_test loads a local directory
    # (load_dataset(path, split="train")) from --dataloader.dataset_path.
    assert _flag(argv, "--dataloader.dataset") == "c4_test"
    assert _flag(argv, "--dataloader.dataset_path") == context["dataset_dir"]
    # llama3_8b's config profiles every 100 steps; DTP takes profile_steps for its own trainer only.
    assert "--profiler.no_enable_profiling" in argv
    # One micro-batch a step and no pipeline: torchtitan 0.3.0's CUDA graphs stay as its config has them.
    assert _flag(argv, "--training.local_batch_size") == "1" and "--training.disable_cuda_graphs" not in argv
    assert "--parallelism.pipeline_parallel_microbatch_size" not in argv


def test_a_pipelined_torchtitan_launch_fills_its_pipeline_without_cuda_graphs(tmp_path: Path) -> None:
    (argv,), _, recipe = _launch(tmp_path, "llama3_1_8b_torchtitan", parallelism={"pipeline": 2})
    assert recipe.micro_batches_per_step == 8
    # A replica's batch of 8 micro-batches of the recipe's 1 sequence: 8 go through the 2 stages a step.
    assert _flag(argv, "--training.local_batch_size") == "8"
    assert _flag(argv, "--parallelism.pipeline_parallel_microbatch_size") == "1"
    # torchtitan 0.3.0 refuses pipeline parallelism with CUDA graphs (Trainer.Config._validate_cuda_graphs).
    assert "--training.disable_cuda_graphs" in argv


def test_megatron_launch_splits_the_70b_model(tmp_path: Path) -> None:
    (argv,), context, recipe = _launch(tmp_path, "llama3_1_70b_megatron")
    assert argv[argv.index("--use-mcore-models") - 1].endswith("/pretrain_gpt.py")
    assert _flag(argv, "--tensor-model-parallel-size") == "8" and _flag(argv, "--pipeline-model-parallel-size") == "2"
    assert "--sequence-parallel" in argv and "--bf16" in argv and "--recompute-activations" in argv
    # 16 nodes x 8 GPUs / (TP 8 x PP 2) = 8 data-parallel replicas, each 4 micro-batches per pipeline stage a
    # step: with one, half of each step would be the pipeline's fill and drain.
    assert _flag(argv, "--global-batch-size") == "64" and _flag(argv, "--micro-batch-size") == "1"
    assert recipe.tokens_per_step(16, 8) == 64 * recipe.seq_len
    assert (_flag(argv, "--num-layers"), _flag(argv, "--num-query-groups")) == ("80", "8")
    assert _flag(argv, "--lr") == str(recipe.lr) and _flag(argv, "--train-iters") == "100"
    # Megatron's index cache, keyed on its settings and not on the data, is the run's own: the shared mirror of the
    # dataset loses it whenever it is staged again, and a dataset uploaded again would meet a stale one.
    assert _flag(argv, "--data-cache-path") == f"{context['workdir']}/data_cache"
    # Llama 3.1's RoPE scaling (factor 8, Megatron's default) and untied output layer.
    assert "--use-rope-scaling" in argv and "--untie-embeddings-and-output-weights" in argv


def test_megatron_ties_llama_3_2_1b_s_output_layer_to_its_embedding(tmp_path: Path) -> None:
    (argv,), _, _ = _launch(tmp_path, "llama3_1_70b_megatron", model="llama3_2_1b")
    assert _flag(argv, "--num-layers") == "16"
    # Its Hugging Face config ties them; its RoPE scaling factor (32) is not one pretrain_gpt.py passes on.
    assert "--untie-embeddings-and-output-weights" not in argv and "--use-rope-scaling" not in argv


def test_a_megatron_job_keeps_its_newest_two_complete_checkpoints(tmp_path: Path) -> None:
    iterations = {f"iter_{step:07d}": {"common.pt": b"x"} for step in (50, 100, 150, 200, 250)}
    # iter_0000250 is past the newest complete save Megatron names: a save that did not finish.
    _, context, _ = _launch(
        tmp_path,
        "llama3_1_70b_megatron",
        checkpoints=iterations | {"not_an_iteration": {}},
        checkpoint_files={"latest_checkpointed_iteration.txt": b"200"},
    )
    left = sorted(path.name for path in Path(context["checkpoint_dir"]).glob("iter_*"))
    assert left == ["iter_0000150", "iter_0000200", "iter_0000250"]
    assert (Path(context["checkpoint_dir"]) / "not_an_iteration").is_dir()
    events = [json.loads(line) for line in (tmp_path / "job.out").read_text().splitlines() if line.startswith("{")]
    assert [e["folder"] for e in events if e["event"] == "checkpoint_pruned"] == ["iter_0000100", "iter_0000050"]


def test_a_first_megatron_job_prunes_nothing(tmp_path: Path) -> None:
    _, context, _ = _launch(tmp_path, "llama3_1_70b_megatron", checkpoints={"iter_0000050": {}, "iter_0000100": {}})
    assert sorted(path.name for path in Path(context["checkpoint_dir"]).iterdir()) == ["iter_0000050", "iter_0000100"]


def test_neuronx_launch_compiles_first_then_trains(tmp_path: Path) -> None:
    (compile_argv, train_argv), context, _ = _launch(tmp_path, "llama3_1_8b_trn1")
    assert (
        compile_argv[:2] == ["--kill-on-bad-exit=1", "neuron_parallel_compile"]
        and _flag(compile_argv, "--steps_this_run") == "2"
    )
    assert _flag(train_argv, "--steps_this_run") == "100" and "neuron_parallel_compile" not in train_argv
    assert _flag(train_argv, "--tensor_parallel_size") == "32" and "--nproc_per_node=32" in train_argv
    assert _flag(train_argv, "--checkpoint_dir") == context["checkpoint_dir"]
    assert _flag(train_argv, "--checkpoint_freq") == "50" and _flag(train_argv, "--loading_step") == "latest_if_exists"
    # The compile pass neither resumes from the run's checkpoint nor saves one, as the trainer's own launch
    # script extracts its graphs.
    assert not {"--checkpoint_dir", "--checkpoint_freq", "--loading_step"} & set(compile_argv)
    assert "--selective_checkpoint_enabled" in compile_argv and "--selective_checkpoint_enabled" in train_argv
    assert "--use_zero_1" in train_argv and "--use_mix_precision" in train_argv
    # A step is one micro-batch (the trainer's default accumulates 64), as DTP counts the step's tokens.
    assert _flag(train_argv, "--grad_accum_usteps") == "1" and _flag(compile_argv, "--grad_accum_usteps") == "1"
    # TP 32 over Llama 3.1 8B's 8 KV heads: each head on 4 ranks, as the reference's launch replicates them.
    assert "--qkv_linear" in train_argv and _flag(train_argv, "--kv_replicator") == "4"


def test_picotron_launch_writes_its_config(tmp_path: Path) -> None:
    (argv,), context, recipe = _launch(tmp_path, "llama3_2_1b_picotron")
    workdir = Path(context["workdir"])
    assert argv[-2:] == ["--config", str(workdir / "picotron.json")] and argv[-3] == "/picotron/train.py"
    config = json.loads((workdir / "picotron.json").read_text())
    # 2 nodes x 8 GPUs / TP 2 = 8 data-parallel replicas.
    assert config["distributed"] | {"backend": None} == {
        "tp_size": 2, "cp_size": 1, "pp_size": 1, "dp_size": 8, "pp_engine": "1f1b", "backend": None, "use_cpu": False
    }  # fmt: skip
    assert config["training"]["total_train_steps"] == 100 and config["training"]["seq_length"] == recipe.seq_len
    assert config["checkpoint"] == {"save_dir": context["checkpoint_dir"], "save_frequency": 50, "load_path": ""}
    assert config["model"]["name"] == context["assets_dir"] == str(tmp_path / "fsx/assets/llama3_2_1b")
    assert (workdir / "hf_model_safetensors").readlink() == Path(context["assets_dir"])
    # The directory stage_data mirrors dataset_uri into.
    assert config["dataset"]["name"] == dataset_dir(str(tmp_path / "fsx"), "picotron", "s3://datasets/picotron/")
    # Every rank tokenises the documents before the first step: only as many as 100 steps of 8 replicas x 4
    # sequences of 4097 tokens need, at 128 tokens or more a document.
    assert config["training"]["gradient_accumulation_steps"] == 1
    assert config["training"]["num_samples"] == 100 * 8 * 4 * 33 == 105600


def test_a_pipelined_picotron_launch_accumulates_micro_batches(tmp_path: Path) -> None:
    _, context, _ = _launch(tmp_path, "llama3_2_1b_picotron", parallelism={"tensor": 2, "pipeline": 2})
    config = json.loads((Path(context["workdir"]) / "picotron.json").read_text())
    # picotron's 1F1B engine runs gradient_accumulation_steps micro-batches through the pipeline a step.
    assert (config["distributed"]["dp_size"], config["training"]["gradient_accumulation_steps"]) == (4, 8)
    assert config["training"]["num_samples"] == 100 * 4 * 8 * 4 * 33


def _picotron_weights(tmp_path: Path, step: int, tp_size: int) -> dict[str, bytes]:
    """What picotron's CheckpointManager writes into a step folder: one torch.save file per TP rank (PP 1)."""
    files = {}
    for tp in range(tp_size):
        path = tmp_path / "weights.pth"
        torch.save({"model": {"w": torch.full((64,), float(tp))}, "trained_steps": step}, path)
        files[f"weights_tp_rank_world_size={tp}_{tp_size}_pp_rank_world_size=0_1.pth"] = path.read_bytes()
    return files


def test_a_requeued_picotron_job_resumes_from_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    recipe = get_recipe("llama3_2_1b_picotron")
    assert (recipe.parallelism.tensor, recipe.parallelism.pipeline) == (2, 1)
    whole = {step: _picotron_weights(tmp_path, step, 2) for step in (50, 100, 150, 200)}
    first, second = whole[200]
    checkpoints = {
        "50": whole[50],
        "100": whole[100],
        "150": {first: whole[150][first]},  # the job died before the second TP rank's file
        "200": {first: whole[200][first], second: whole[200][second][:-100]},  # ... or while writing it
        "250": {},  # created, nothing written yet
        "not-a-step": whole[50],
    }
    _, context, _ = _launch(tmp_path, "llama3_2_1b_picotron", checkpoints=checkpoints)
    config = json.loads((Path(context["workdir"]) / "picotron.json").read_text())
    assert config["checkpoint"]["load_path"] == f"{context['checkpoint_dir']}/100"
    events = [json.loads(line) for line in (tmp_path / "job.out").read_text().splitlines() if line.startswith("{")]
    assert [e["step"] for e in events if e["event"] == "incomplete_checkpoint"] == [250, 200, 150]
    assert [e["from"] for e in events if e["event"] == "resume"] == [f"{context['checkpoint_dir']}/100"]


def test_a_first_picotron_job_starts_without_a_checkpoint(tmp_path: Path) -> None:
    _, context, _ = _launch(tmp_path, "llama3_2_1b_picotron", checkpoints={"50": {}})
    config = json.loads((Path(context["workdir"]) / "picotron.json").read_text())
    assert config["checkpoint"]["load_path"] == ""


def test_nemo_launch_runs_one_task_per_gpu_with_the_recipe_s_overrides(tmp_path: Path) -> None:
    (argv,), context, recipe = _launch(tmp_path, "llama3_1_8b_nemo")
    assert argv[argv.index("llm") - 1 :][:7] == ["nemo", "llm", "pretrain", "--factory", "llama31_8b", "--direct", "-y"]
    overrides = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    # 2 nodes x 8 GPUs / CP 2 = 8 data-parallel replicas, one micro-batch each.
    assert overrides == {
        "trainer.num_nodes": "2",
        "trainer.devices": "8",
        "trainer.max_steps": "100",
        "trainer.strategy.tensor_model_parallel_size": "1",
        "trainer.strategy.pipeline_model_parallel_size": "1",
        "trainer.strategy.context_parallel_size": "2",
        # NeMo's llama31_70b recipe has a virtual pipeline of 5 and sequence parallelism, mixtral_8x7b's a
        # virtual pipeline of 8 and 8-way expert parallelism: the run has the recipe's split only.
        "trainer.strategy.virtual_pipeline_model_parallel_size": "None",
        "trainer.strategy.sequence_parallel": "false",
        "trainer.strategy.expert_model_parallel_size": "1",
        # Llama's vocabulary, not the 50304 the model takes from MockDataModule's GPT-2 tokenizer.
        "model.config.vocab_size": "128256",
        "data.seq_length": "8192",
        "data.micro_batch_size": "1",
        "data.global_batch_size": "8",
        "optim.config.lr": str(recipe.lr),
        "optim.lr_scheduler.warmup_steps": str(recipe.warmup_steps),  # the recipe's, not NeMo's 2000
        # DTP's trainer's floor; NeMo's scheduler raises when the learning rate starts below its min_lr.
        "optim.lr_scheduler.min_lr": str(recipe.lr / 10),
        "log.log_dir": context["checkpoint_dir"],
        "log.ckpt.every_n_train_steps": "50",
        # NeMo's default_log checkpoints every 15 minutes, which Lightning refuses beside every_n_train_steps.
        "log.ckpt.train_time_interval": "None",
    }
    script = (tmp_path / "train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8" in script and "torch.distributed.run" not in script


def test_a_tensor_parallel_nemo_launch_splits_sequences_too(tmp_path: Path) -> None:
    (argv,), _, _ = _launch(tmp_path, "llama3_1_8b_nemo", parallelism={"tensor": 2, "pipeline": 2})
    overrides = dict(arg.split("=", 1) for arg in argv if "=" in arg and not arg.startswith("-"))
    assert overrides["trainer.strategy.sequence_parallel"] == "true"
    # 2 nodes x 8 GPUs / (TP 2 x PP 2) = 4 replicas, each 8 micro-batches a step.
    assert overrides["data.global_batch_size"] == "32"


ALL_FRAMEWORK_RECIPES = [
    "llama3_1_8b_torchtitan",
    "llama3_1_70b_megatron",
    "llama3_1_8b_trn1",
    "llama3_2_1b_picotron",
    "llama3_1_8b_nemo",
]


@pytest.mark.parametrize("recipe_name", ALL_FRAMEWORK_RECIPES)
def test_the_jobs_output_reaches_its_parser_through_train_log(tmp_path: Path, recipe_name: str) -> None:
    _, context, recipe = _launch(tmp_path, recipe_name)
    lines = Path(context["log_path"]).read_text().splitlines()
    summary = summarize_log(recipe.framework, lines, seq_len=recipe.seq_len, world_size=32)
    assert len(summary.steps) >= 4 and summary.final_loss < summary.first_loss


@pytest.mark.parametrize("recipe_name", ALL_FRAMEWORK_RECIPES)
def test_extra_env_overrides_the_jobs_own_settings(tmp_path: Path, recipe_name: str) -> None:
    # Each name is one a launch template or _env.sh sets itself: the run's value must still be the one srun sees.
    extra_env = {
        "NCCL_NVLS_ENABLE": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "32",
        "FI_PROVIDER": "tcp",
        "NEURON_RT_NUM_CORES": "2",
        "HF_TOKEN": "hf_x",
        "OMP_NUM_THREADS": "3",
    }
    _launch(tmp_path, recipe_name, extra_env=extra_env)
    seen = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert {name: seen.get(name) for name in extra_env} == extra_env
