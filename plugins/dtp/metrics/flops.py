"""Model FLOPs utilisation by the accounting of DTP's trainer, for the runs of frameworks that count FLOPs otherwise
or not at all.

``flops_per_token`` is that of include/training/model.py, whose torch the Airflow components do not have: 6 x the
parameters a token passes through but the token embedding, plus attention's 12 x layers x heads x head_dim x seq,
not halved for the causal mask (torchtitan's convention). tests/unit/test_framework_logs.py keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopsShape:
    """What the accounting reads of a model: the parameters a token passes through (its ``top_k`` experts, not all)
    but the token embedding, its layers, and its attention's width (heads x head_dim)."""

    matmul_parameters: int
    n_layers: int
    attention_width: int


# The shapes of the models the recipes name (include/training/model.py ``MODELS``).
FLOPS_SHAPES = {
    "tiny": FlopsShape(426_624, n_layers=2, attention_width=128),
    "tiny_deep": FlopsShape(820_352, n_layers=4, attention_width=128),
    "small": FlopsShape(3_213_568, n_layers=4, attention_width=256),
    "llama3_2_1b": FlopsShape(1_235_814_400, n_layers=16, attention_width=2048),
    "llama3_2_3b": FlopsShape(3_212_749_824, n_layers=28, attention_width=3072),
    "llama3_1_8b": FlopsShape(7_504_924_672, n_layers=32, attention_width=4096),
    "llama3_1_70b": FlopsShape(69_503_033_344, n_layers=80, attention_width=8192),
    "tiny_moe": FlopsShape(427_648, n_layers=2, attention_width=128),
    "mixtral_8x7b": FlopsShape(12_748_853_248, n_layers=32, attention_width=4096),
}


def flops_per_token(model: str, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` (a name of ``FLOPS_SHAPES``) at ``seq_len``."""
    shape = FLOPS_SHAPES[model]
    return 6 * shape.matmul_parameters + 12 * shape.n_layers * shape.attention_width * seq_len


def model_flops_utilisation(
    model: str, seq_len: int, *, tokens_per_s: float, world_size: int, peak_flops: float
) -> float:
    """The fraction of ``peak_flops`` (per accelerator) each of ``world_size`` accelerators spends on ``model``'s
    training FLOPs, at ``tokens_per_s`` for the whole job."""
    return flops_per_token(model, seq_len) * tokens_per_s / world_size / peak_flops
