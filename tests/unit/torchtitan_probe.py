"""Run by test_torchtitan_shape.py in .venv-torchtitan: what torchtitan makes of benchmarks/torchtitan_shape.py.

Reads a JSON request on stdin ({"args": torchtitan.train's arguments from the benchmark}) and prints one
JSON object of what it found; the test asserts on it. CPU only: torchtitan's trainer itself needs CUDA,
so this stops at the pieces the trainer is built from (config, train spec, model, dataloader).
"""

from __future__ import annotations

import json
import sys

import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import torchtitan_shape
from model import MODELS, Transformer
from train import batch_for


def models(spec) -> dict:
    """Each flavor's parameter count and SwiGLU width, built on the meta device."""
    found = {}
    for name, args in spec.model_args.items():
        with torch.device("meta"):
            model = spec.model_cls(args)
        found[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "ffn_dim": model.layers["0"].feed_forward.w1.out_features,
        }
    return found


def logits_difference(spec, seq_len: int = 64) -> float:
    """Largest difference between DTP's tiny model and torchtitan's, given DTP's weights."""
    torch.manual_seed(0)
    ours = Transformer(MODELS["tiny"], seq_len)
    args = spec.model_args["tiny"]
    args.max_seq_len = seq_len
    theirs = spec.model_cls(args)
    with torch.no_grad():
        theirs.init_weights()
    try:
        theirs.load_state_dict(ours.state_dict())
    except RuntimeError:  # another shape: no weights to compare with
        return float("inf")
    tokens = torch.randint(0, MODELS["tiny"].vocab_size, (2, seq_len))
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens)).abs().max().item()


def batches_match(spec, job_config, count: int = 3) -> bool:
    """Whether the spec's dataloader yields DTP's trainer's first ``count`` batches."""
    loader = spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=None, job_config=job_config)
    for step, (inputs, labels) in zip(range(count), loader, strict=False):
        want_inputs, want_labels = batch_for(loader.data, loader.shape, step, 0)
        if not (torch.equal(inputs["input"], want_inputs) and torch.equal(labels, want_labels)):
            return False
    return True


def missing_data_error(spec, job_config) -> str | None:
    """The spec's dataloader builder's error when no byte-token file is named."""
    job_config.training.dataset_path = None
    try:
        spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=None, job_config=job_config)
    except ValueError as err:
        return str(err)
    return None


def main() -> None:
    job_config = ConfigManager().parse_args(json.load(sys.stdin)["args"])
    spec = get_train_spec(job_config.model.name)
    found = {
        "train_spec": torchtitan_shape.TRAIN_SPEC,
        "job": {
            "model": [job_config.model.name, job_config.model.flavor],
            "seq_len": job_config.training.seq_len,
            "local_batch_size": job_config.training.local_batch_size,
            "steps": job_config.training.steps,
            "mixed_precision_param": job_config.training.mixed_precision_param,
            "lr": job_config.optimizer.lr,
            "weight_decay": job_config.optimizer.weight_decay,
            "warmup_steps": job_config.lr_scheduler.warmup_steps,
            "activation_checkpoint": job_config.activation_checkpoint.mode,
            "compile": job_config.compile.enable,
            "log_freq": job_config.metrics.log_freq,
            "checkpoint": job_config.checkpoint.enable,
            "profiled_step": job_config.profiling.profile_freq if job_config.profiling.enable_profiling else None,
        },
        "models": models(spec),
        "logits_difference": logits_difference(spec),
        "batches_match": batches_match(spec, job_config),
        "missing_data_error": missing_data_error(spec, job_config),
    }
    print(json.dumps(found))


if __name__ == "__main__":
    main()
