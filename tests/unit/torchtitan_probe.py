"""Run by test_torchtitan_shape.py in .venv-torchtitan: what torchtitan makes of benchmarks/torchtitan_shape.py.

Reads a JSON request on stdin ({"args": torchtitan.train's arguments from the benchmark, "batches": how
many of the dataloader's batches to keep, "batches_out": the .npz to keep them in}) and prints one JSON
object of what it found; the test asserts on it. CPU only: torchtitan's trainer itself needs CUDA,
so this stops at the pieces the trainer is built from (config, train spec, model, dataloader).
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import torchtitan_shape
from model import MODELS, Transformer


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


def loader_batches(spec, job_config, count: int, out: str) -> int:
    """Write the spec's dataloader's first ``count`` batches (inputs and labels, stacked) to ``out``, an
    ``.npz`` the test compares with DTP's trainer's batches; how many batches the loader yielded."""
    loader = spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=None, job_config=job_config)
    batches = list(itertools.islice(iter(loader), count))
    inputs = [batch["input"].numpy() for batch, _ in batches]
    labels = [label.numpy() for _, label in batches]
    np.savez(out, inputs=np.array(inputs), labels=np.array(labels))
    return len(batches)


def missing_data_error(spec, job_config) -> str | None:
    """The spec's dataloader builder's error when no byte-token file is named."""
    job_config.training.dataset_path = None
    try:
        spec.build_dataloader_fn(dp_world_size=1, dp_rank=0, tokenizer=None, job_config=job_config)
    except ValueError as err:
        return str(err)
    return None


def main() -> None:
    request = json.load(sys.stdin)
    job_config = ConfigManager().parse_args(request["args"])
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
        "batches_yielded": loader_batches(spec, job_config, request["batches"], request["batches_out"]),
        "missing_data_error": missing_data_error(spec, job_config),
    }
    print(json.dumps(found))


if __name__ == "__main__":
    main()
