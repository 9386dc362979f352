"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU), dense or
Mixtral-style mixture of experts.

``MODELS`` maps a registry name to its shape, so a recipe names "llama3_8b"
instead of repeating dimensions; ``flops_per_token`` is the accounting MFU uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 256
    rope_theta: float = 500000.0
    rope_scaling: float = 1.0  # the factor of Meta's "llama3" RoPE scaling (llama3_scaled); 1: none
    norm_eps: float = 1e-5
    n_experts: int = 0  # 0: a dense SwiGLU; else that many SwiGLU experts per layer
    top_k: int = 2  # experts each token is routed to

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Meta's "llama3" RoPE scaling, as the Hugging Face configs of Llama 3.1 and 3.2 give it (``rope_scaling``) beside
# each model's factor: the context length the model was first trained at, and the wavelengths, as fractions of it,
# from which frequencies are scaled down (longer than original / low factor: by the whole factor; shorter than
# original / high factor: not at all; between the two: interpolated).
ROPE_ORIGINAL_CONTEXT = 8192
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0

# Llama 3.1 and 3.2 scale RoPE by 8 and 32 (their Hugging Face configs). A checkpoint of one of them written before
# the trainer scaled RoPE still resumes (RoPE has no weights), but its weights learnt positions from unscaled
# rotations: resumed, a position no longer means what it did to them.
# Llama 3.2 1B and 3B keep an output layer of their own here, where Meta's ties it to the token embedding (1.50B and
# 3.61B parameters here, 1.24B and 3.21B published): torchtitan's Llama 3, which the GPU benchmark compares the
# trainer with, has no tied embeddings.
MODELS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "tiny_deep": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "small": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768),
    "llama3_2_1b": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, rope_scaling=32.0
    ),
    "llama3_2_3b": ModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, rope_scaling=32.0
    ),
    "llama3_1_8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_scaling=8.0
    ),
    "llama3_1_70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256, rope_scaling=8.0
    ),
    "tiny_moe": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, n_experts=4),
    "mixtral_8x7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000, rope_theta=1e6, n_experts=8
    ),
}


def rope_frequencies(args: ModelArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's rotations, ``seq_len`` positions by ``head_dim / 2`` frequencies, as unit complex numbers; with the
    frequencies scaled as Meta's Llama 3.1 and 3.2 (and torchtitan's ``precompute_freqs_cis``) scale them when
    ``args.rope_scaling`` is not 1."""
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    if args.rope_scaling != 1:
        inv = llama3_scaled(inv, args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return torch.polar(torch.ones_like(angles), angles)


def llama3_scaled(inv: torch.Tensor, factor: float) -> torch.Tensor:
    """RoPE frequencies ``inv`` (radians per position) scaled by Meta's "llama3" rule: a wavelength longer than
    ``ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR`` is stretched ``factor`` times, one shorter than
    ``ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR`` is kept, and one between gets a frequency interpolated
    between the two by how many times it fits in the original context."""
    wavelength = 2 * math.pi / inv
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelength - ROPE_LOW_FREQ_FACTOR) / (
        ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
    )
    interpolated = (1 - smooth) * inv / factor + smooth * inv
    long = wavelength > ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    short = wavelength < ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    return torch.where(long, inv / factor, torch.where(short, inv, interpolated))


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * freqs[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        a = self.args
        q = self.wq(x).view(bsz, seq, a.n_heads, a.head_dim)
        k = self.wk(x).view(bsz, seq, a.n_kv_heads, a.head_dim)
        v = self.wv(x).view(bsz, seq, a.n_kv_heads, a.head_dim)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=a.n_kv_heads != a.n_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtureOfExperts(nn.Module):
    """Mixtral's sparse feed-forward: a router picks ``top_k`` experts per token, weighted by the softmax of
    their logits. No load-balancing loss is added to the training loss."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.top_k
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args) for _ in range(args.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.router(tokens), self.top_k, dim=-1)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(tokens.dtype)
        out = torch.zeros_like(tokens)
        # Every expert runs, on no rows when no token chose it here, so each has a gradient on every rank:
        # FSDP reduce-scatters the same gradients everywhere, and a rank without an expert's would not match.
        for index, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == index, as_tuple=True)
            out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = MixtureOfExperts(args) if args.n_experts else FeedForward(args)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder; ``layers`` is a ModuleList so FSDP can shard block by block."""

    def __init__(self, args: ModelArgs, seq_len: int, seed: int = 0) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.seq_len = seq_len
        self.register_buffer("freqs", rope_frequencies(args, seq_len), persistent=False)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """(Re)initialise the parameters and the RoPE buffer where they are, from ``seed`` alone: matrices normal
        (std 0.02, less for the projections into the residual stream), norms one. A model built on the meta device
        (nothing to initialise there) and sharded by FSDP2, then given memory by ``to_empty``, gets its shards of
        the model the same seed makes whole on one device: each rank draws a parameter whole, keeps its shard and
        drops the rest, so no device ever holds more than one whole parameter."""
        device = self.output.weight.device
        if device.type == "meta":
            return
        self.freqs = rope_frequencies(self.args, self.seq_len, device)
        generator = torch.Generator(device).manual_seed(seed)
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                value = torch.empty(param.shape, device=device).normal_(mean=0.0, std=std, generator=generator)
            else:
                value = torch.ones(param.shape, device=device)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs = self.freqs[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        return self.output(self.norm(h))


def count_parameters(args: ModelArgs, active: bool = False) -> int:
    """All parameters, or (``active``) those one token passes through: its ``top_k`` experts, not all."""
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    experts = (args.top_k if active else args.n_experts) if args.n_experts else 1
    ffn = experts * 3 * args.dim * args.ffn_dim + args.dim * args.n_experts  # SwiGLU experts + router
    return args.n_layers * (attn + ffn + 2 * args.dim) + 2 * args.vocab_size * args.dim + args.dim


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the active parameters but the token embedding, plus attention's
    12 x layers x heads x head_dim x seq, not halved for the causal mask (torchtitan's convention)."""
    dense = count_parameters(args, active=True) - args.vocab_size * args.dim
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * dense + attention
