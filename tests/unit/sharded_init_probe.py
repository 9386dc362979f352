"""Run by tests/unit/test_trainer_models.py as ``torchrun --nproc_per_node=2 sharded_init_probe.py MODEL OUT``.

Builds the trainer's model for MODEL, sharded over the ranks from the meta device, and writes to OUT (rank 0)
the largest difference, per parameter and for the RoPE buffer, between it and the model the same seed makes
whole on one device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "include" / "training"))
from model import MODELS, Transformer
from train import TrainConfig, build

SEED, SEQ_LEN = 7, 32


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    cfg = TrainConfig(model=name, data_path="", checkpoint_dir="", metrics_path="", seq_len=SEQ_LEN, seed=SEED)
    sharded, _ = build(cfg, torch.device("cpu"), dist.get_world_size())
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        whole = Transformer(MODELS[name], SEQ_LEN, seed=SEED)
        differences = {key: (full[key] - value).abs().max().item() for key, value in whole.state_dict().items()}
        differences["freqs"] = (sharded.freqs - whole.freqs).abs().max().item()
        shards = {key: list(param.to_local().shape) for key, param in sharded.named_parameters()}
        out.write_text(json.dumps({"differences": differences, "local_shapes": shards}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
