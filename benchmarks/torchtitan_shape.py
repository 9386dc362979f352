"""DTP's model shapes as a torchtitan train spec, for ``benchmarks/trainer_mfu.py``'s comparison.

Imported by torchtitan 0.2.2 through ``--experimental.custom_import torchtitan_shape`` (with
``benchmarks/`` and ``include/training/`` on PYTHONPATH), it registers the train spec ``dtp_llama3``:
torchtitan's own Llama 3 decoder, parallelisation, optimizer, loss and metrics, with one flavor per
dense DTP model of ``include/training/model.py`` (the same dimensions, untied embeddings and RoPE
scaling as DTP's: Meta's "llama3" scaling for Llama 3.1 and 3.2, none for the others), fed the same
batches as DTP's trainer (``train.batch_for`` over the same byte-token file,
``--training.dataset_path``). Attention is ``F.scaled_dot_product_attention`` on both sides, so the
comparison is of the training stacks, not of attention kernels.

    torchrun --standalone --nproc_per_node=1 -m torchtitan.train \\
        --experimental.custom_import torchtitan_shape --model.name dtp_llama3 --model.flavor llama3_2_1b \\
        --training.dataset_path tokens.bin --training.seq_len 2048 --training.local_batch_size 4 ...
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.config import JobConfig
from torchtitan.models.llama3 import TransformerModelArgs, get_train_spec
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.protocols.train_spec import register_train_spec

from model import MODELS, ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs
from train import TrainConfig, batch_for

TRAIN_SPEC = "dtp_llama3"


def transformer_args(args: ModelArgs) -> TransformerModelArgs:
    """torchtitan's Llama 3 arguments for ``args``' shape. torchtitan sizes the SwiGLU hidden layer as
    8/3 x dim rounded up to ``multiple_of``; with ``multiple_of`` at DTP's ``ffn_dim`` (never below
    8/3 x dim in ``MODELS``) that is ``ffn_dim``. RoPE is scaled as DTP's model scales it (a factor of 1 leaves
    it unscaled)."""
    return TransformerModelArgs(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        multiple_of=args.ffn_dim,
        norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        rope_scaling_args=RoPEScalingArgs(
            scaling_factor=args.rope_scaling,
            low_freq_factor=ROPE_LOW_FREQ_FACTOR,
            high_freq_factor=ROPE_HIGH_FREQ_FACTOR,
            original_max_position_embeddings=ROPE_ORIGINAL_CONTEXT,
        ),
    )


class TokenFileDataLoader(BaseDataLoader):
    """DTP's trainer's batches (``train.batch_for``, by step and rank) over a byte-token file."""

    def __init__(self, path: str, *, seq_len: int, micro_batch: int, rank: int, world: int = 1) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.shape = TrainConfig(
            model="", data_path=path, checkpoint_dir="", metrics_path="", seq_len=seq_len, micro_batch=micro_batch
        )
        self.rank, self.world = rank, world
        self.step = 0

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            inputs, labels = batch_for(self.data, self.shape, self.step, self.rank, self.world)
            self.step += 1
            yield {"input": inputs}, labels

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.step = state_dict["step"]


def build_token_file_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: object, job_config: JobConfig
) -> TokenFileDataLoader:
    """torchtitan's dataloader builder hook: ``--training.dataset_path`` names the byte-token file."""
    training = job_config.training
    if not training.dataset_path:
        raise ValueError("the dtp_llama3 train spec reads byte tokens from --training.dataset_path; none was given")
    return TokenFileDataLoader(
        training.dataset_path,
        seq_len=training.seq_len,
        micro_batch=training.local_batch_size,
        rank=dp_rank,
        world=dp_world_size,
    )


def register() -> None:
    """Register ``dtp_llama3``: torchtitan's Llama 3 train spec with DTP's shapes, data and no tokenizer."""
    spec = get_train_spec()
    spec.model_args = {name: transformer_args(args) for name, args in MODELS.items() if not args.n_experts}
    spec.build_dataloader_fn = build_token_file_dataloader
    spec.build_tokenizer_fn = None
    register_train_spec(TRAIN_SPEC, spec)


register()
