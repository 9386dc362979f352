"""include/training/model.py and the in-process pieces of train.py and checkpoint.py."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoint
import train
from model import MODELS, Transformer, count_parameters, flops_per_token, rope_frequencies
from train import TrainConfig, batch_for, lr_at, mfu_peak, peak_flops

# Published parameter counts (untied embeddings): Llama 3.1 8B and 70B.
PUBLISHED = {"llama3_1_8b": 8_030_261_248, "llama3_1_70b": 70_553_706_496, "mixtral_8x7b": 46_702_792_704}


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(MODELS["tiny"], seq_len=32)


def test_forward_shape(tiny: Transformer) -> None:
    tokens = torch.randint(0, 256, (3, 32))
    logits = tiny(tokens)
    assert logits.shape == (3, 32, 256)
    assert torch.isfinite(logits).all()
    # A shorter sequence uses a prefix of the RoPE table.
    assert tiny(tokens[:, :7]).shape == (3, 7, 256)


def test_forward_is_causal(tiny: Transformer) -> None:
    tokens = torch.randint(0, 256, (1, 32))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 256
    with torch.no_grad():
        a, b = tiny(tokens), tiny(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_count_parameters_matches_the_tiny_module(tiny: Transformer) -> None:
    assert count_parameters(MODELS["tiny"]) == sum(p.numel() for p in tiny.parameters()) == 459_392


@pytest.mark.parametrize("name", list(MODELS))
def test_count_parameters_matches_every_module(name: str) -> None:
    with torch.device("meta"):
        model = Transformer(MODELS[name], seq_len=16)
    assert count_parameters(MODELS[name]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "published"), PUBLISHED.items())
def test_count_parameters_matches_published_sizes(name: str, published: int) -> None:
    assert count_parameters(MODELS[name]) == published


@pytest.mark.parametrize("name", list(MODELS))
def test_flops_per_token(name: str) -> None:
    args = MODELS[name]
    fpt = flops_per_token(args, 128)
    non_embedding = count_parameters(args, active=True) - args.vocab_size * args.dim
    assert fpt > 6 * non_embedding > 0
    assert flops_per_token(args, 8192) > fpt  # attention grows with the sequence


def test_a_mixtral_token_passes_through_two_of_eight_experts() -> None:
    args = MODELS["mixtral_8x7b"]
    assert count_parameters(args, active=True) == 12_879_925_248  # Mixtral's published "12.9B active"
    assert count_parameters(MODELS["llama3_1_8b"], active=True) == count_parameters(MODELS["llama3_1_8b"])


def test_moe_routes_each_token_to_its_top_k_experts() -> None:
    torch.manual_seed(0)
    model = Transformer(MODELS["tiny_moe"], seq_len=16)
    moe = model.layers[0].feed_forward
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        out = moe(x)
        # The same sum, written per token: softmax over the two best router logits, weighting those experts.
        token = x[1, 5]
        logits, best = torch.topk(moe.router(token), 2)
        weights = torch.softmax(logits, dim=-1)
        expected = sum(w * moe.experts[int(e)](token) for w, e in zip(weights, best, strict=True))
    torch.testing.assert_close(out[1, 5], expected)


def test_moe_model_trains() -> None:
    torch.manual_seed(0)
    model = Transformer(MODELS["tiny_moe"], seq_len=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    tokens = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert all(p.grad is not None for p in model.layers[0].feed_forward.router.parameters())


def test_head_dims_are_even_and_divide() -> None:
    for name, args in MODELS.items():
        assert args.dim % args.n_heads == 0, name
        assert args.n_heads % args.n_kv_heads == 0, name
        assert args.head_dim % 2 == 0, name  # RoPE pairs


# Meta's "llama3" RoPE scaling factors, from the Hugging Face configs' ``rope_scaling`` (meta-llama/Llama-3.1-8B,
# Llama-3.2-1B): 8 for Llama 3.1, 32 for Llama 3.2, with low_freq_factor 1, high_freq_factor 4 and
# original_max_position_embeddings 8192 for both.
ROPE_SCALING = {"llama3_2_1b": 32.0, "llama3_2_3b": 32.0, "llama3_1_8b": 8.0, "llama3_1_70b": 8.0}


def meta_llama3_frequencies(theta: float, head_dim: int, factor: float) -> list[float]:
    """RoPE's frequencies scaled as Meta's reference code (llama-models' ``apply_scaling``) scales them, one by
    one, in double precision."""
    low_freq_factor, high_freq_factor, original_context = 1.0, 4.0, 8192
    scaled = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original_context / high_freq_factor:
            scaled.append(freq)
        elif wavelength > original_context / low_freq_factor:
            scaled.append(freq / factor)
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return scaled


def assert_rotates_by(freqs: torch.Tensor, frequencies: list[float]) -> None:
    """``freqs`` turns position 1 by each of ``frequencies`` (to float32's precision) and position p by p times
    as much, e^(i p f)."""
    expected = torch.tensor(frequencies, dtype=torch.float64)
    torch.testing.assert_close(freqs[1].angle().double(), expected, rtol=1e-6, atol=0)
    angles = torch.outer(torch.arange(len(freqs), dtype=torch.float64), expected)
    rotations = torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(freqs.to(torch.complex128), rotations, atol=5e-4, rtol=0)


def test_llama_3_1_and_3_2_scale_rope_as_published_and_no_other_model_does() -> None:
    assert {name: args.rope_scaling for name, args in MODELS.items() if args.rope_scaling != 1} == ROPE_SCALING


@pytest.mark.parametrize("name", list(ROPE_SCALING))
def test_scaled_rope_frequencies_are_meta_s(name: str) -> None:
    args = MODELS[name]
    expected = meta_llama3_frequencies(args.rope_theta, args.head_dim, ROPE_SCALING[name])
    unscaled = [1.0 / args.rope_theta ** (i / args.head_dim) for i in range(0, args.head_dim, 2)]
    # The shape's frequencies fall in all three of the rule's bands: kept, divided by the factor, interpolated.
    kept = sum(e == u for e, u in zip(expected, unscaled, strict=True))
    stretched = sum(e == u / ROPE_SCALING[name] for e, u in zip(expected, unscaled, strict=True))
    assert kept and stretched and kept + stretched < len(expected)
    freqs = rope_frequencies(args, 2048)
    assert freqs.shape == (2048, args.head_dim // 2)
    assert_rotates_by(freqs, expected)


@pytest.mark.parametrize("name", [name for name in MODELS if name not in ROPE_SCALING])
def test_unscaled_rope_frequencies_are_plain_rope(name: str) -> None:
    args = MODELS[name]
    plain = [1.0 / args.rope_theta ** (i / args.head_dim) for i in range(0, args.head_dim, 2)]
    assert_rotates_by(rope_frequencies(args, 2048), plain)


# --- train.py helpers ---------------------------------------------------------------------------


def config(**overrides: object) -> TrainConfig:
    paths = {"data_path": "-", "checkpoint_dir": "-", "metrics_path": "-"}
    return TrainConfig(model="tiny", **{**paths, **overrides})


def test_lr_schedule_peaks_once_and_reaches_its_floor_on_the_last_step() -> None:
    cfg = config(lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) < 1.0
    assert lr_at(cfg, 59) == pytest.approx(0.55)
    assert lr_at(cfg, 109) == pytest.approx(0.1)  # the last of steps 0..109
    assert lr_at(cfg, 500) == pytest.approx(0.1)  # floor after the end
    decay = [lr_at(cfg, s) for s in range(9, 110)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert lr_at(cfg, 109, schedule_steps=210) > 0.1  # a resumed run keeps the length it started with


def test_batches_depend_on_the_seed_step_and_rank() -> None:
    data = np.frombuffer(bytes(range(256)) * 20, dtype=np.uint8)
    cfg = config(seq_len=16, micro_batch=4)
    inputs, targets = batch_for(data, cfg, step=3, rank=1, world=2)
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == torch.int64
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    again, _ = batch_for(data, cfg, step=3, rank=1, world=2)
    torch.testing.assert_close(inputs, again)
    assert not torch.equal(inputs, batch_for(data, cfg, step=3, rank=0, world=2)[0])
    assert not torch.equal(inputs, batch_for(data, cfg, step=4, rank=1, world=2)[0])
    other_seed = config(seq_len=16, micro_batch=4, seed=1)
    assert not torch.equal(inputs, batch_for(data, other_seed, step=3, rank=1, world=2)[0])


def _windows(data: np.ndarray, inputs: torch.Tensor, seq_len: int) -> list[int]:
    """Which window (of ``seq_len`` + 1 tokens, ``seq_len`` apart) each row of ``inputs`` is."""
    rows = data[: (len(data) - 1) // seq_len * seq_len].reshape(-1, seq_len)
    return [next(i for i, row in enumerate(rows) if np.array_equal(row, r)) for r in inputs.numpy()]


def test_a_pass_over_the_data_deals_every_window_once_and_no_two_ranks_share_one() -> None:
    """3 ranks x 2 sequences a step over 12 windows: 2 steps make a pass, each window once; the next pass, a new
    order. Each window's tokens are unique, so a row names its window."""
    seq_len, windows, world = 8, 12, 3
    data = np.arange(windows * seq_len + 1, dtype=np.int64)
    cfg = config(seq_len=seq_len, micro_batch=2)
    dealt = [
        window
        for step in range(4)
        for rank in range(world)
        for window in _windows(data, batch_for(data, cfg, step=step, rank=rank, world=world)[0], seq_len)
    ]
    first_pass, second_pass = dealt[:windows], dealt[windows:]
    assert sorted(first_pass) == sorted(second_pass) == list(range(windows))
    assert first_pass != second_pass


def test_mfu_is_against_a_bf16_peak_so_only_bf16_runs_have_one() -> None:
    cpu = torch.device("cpu")
    assert mfu_peak(config(precision="bf16", peak_flops=989e12), cpu) == 989e12  # the instance type's figure
    assert mfu_peak(config(precision="fp32", peak_flops=989e12), cpu) is None
    assert mfu_peak(config(precision="bf16"), cpu) is None  # no figure for a CPU


def test_a_resume_on_another_world_size_continues_after_the_samples_dealt() -> None:
    """Steps 0-1 on 3 ranks deal samples 0-11 (a pass over 12 windows); resumed at step 2 on 2 ranks, steps 2-4
    deal the next pass's samples 12-23 and no window of it twice."""
    seq_len, windows = 8, 12
    data = np.arange(windows * seq_len + 1, dtype=np.int64)
    cfg = config(seq_len=seq_len, micro_batch=2)
    after = [
        w
        for step in range(2, 5)
        for rank in range(2)
        for w in _windows(data, batch_for(data, cfg, step, rank, 2, resumed_from=(2, 12))[0], seq_len)
    ]
    uninterrupted = [w for rank in range(3) for w in _windows(data, batch_for(data, cfg, 2, rank, 3)[0], seq_len)]
    assert sorted(after) == list(range(windows))  # the whole second pass, each window once
    assert after[:6] == uninterrupted  # in the order the 3 ranks would have been dealt it
    # Without the samples the checkpoint recorded, a resume at step 2 keeps today's sample index.
    torch.testing.assert_close(batch_for(data, cfg, 2, 1, 2, resumed_from=(2, 8))[0], batch_for(data, cfg, 2, 1, 2)[0])


def test_the_a10g_peak_is_aws_s_not_the_a10_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.torch.cuda, "get_device_name", lambda device: "NVIDIA A10G")
    assert peak_flops(torch.device("cuda", 0)) == 70e12


def test_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "tiny", "data_path": "d", "checkpoint_dir": "c", "metrics_path": "m"}))
    assert TrainConfig.load(str(path)) == config(data_path="d", checkpoint_dir="c", metrics_path="m")
    path.write_text(json.dumps({"model": "tiny", "data_path": "d", "checkpoint_dir": "c", "metrics_path": "m", "x": 1}))
    with pytest.raises(TypeError):
        TrainConfig.load(str(path))


# --- checkpoint.py --------------------------------------------------------------------------------


def make_step(directory: Path, name: str, complete: bool = True) -> Path:
    path = directory / name
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"x")
    if complete:
        (path / "meta.json").write_text("{}")
    return path


def test_newest_complete_orders_numerically_and_skips_incomplete(tmp_path: Path) -> None:
    assert checkpoint.newest_complete(tmp_path) is None
    make_step(tmp_path, "step_9")
    make_step(tmp_path, "step_10")
    make_step(tmp_path, "step_30", complete=False)
    make_step(tmp_path, "tmp-step_40")
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "step_10"


def test_clean_partial_promotes_whole_checkpoints_and_removes_torn_ones(tmp_path: Path) -> None:
    make_step(tmp_path, "step_10")
    (make_step(tmp_path, "tmp-step_20") / "meta.json").write_text('{"step": 20}')  # saved, killed before the rename
    make_step(tmp_path, "tmp-step_30", complete=False)  # killed before meta.json
    make_step(tmp_path, "tmp-step_40")  # a meta.json that names no step
    checkpoint.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_20"]


@pytest.fixture
def single_process_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_save_is_atomic_keeps_two_and_loads_back(tmp_path: Path, single_process_group: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (10, 20, 30):
        path = checkpoint.save(tmp_path, step, model, optimizer, {"loss": 1.5})
        assert path == tmp_path / f"step_{step}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_20", "step_30"]
    assert json.loads((tmp_path / "step_30" / "meta.json").read_text()) == {"step": 30, "loss": 1.5}

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    meta = checkpoint.load(checkpoint.newest_complete(tmp_path), fresh, fresh_opt)
    assert meta["step"] == 30
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    state = fresh_opt.state_dict()["state"]
    assert state and all(int(s["step"]) == 1 for s in state.values())


def test_save_and_load_run_their_collectives_on_the_group_given(
    tmp_path: Path, single_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer gives checkpoints a group whose timeout outlasts a large model's save; the default group's
    (collective_timeout_s) would not."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=3600))
    used: list[object] = []
    for name in ("save", "load"):
        real = getattr(checkpoint.dcp, name)

        def spy(*args, real=real, **kwargs):
            used.append(kwargs.get("process_group"))
            return real(*args, **kwargs)

        monkeypatch.setattr(checkpoint.dcp, name, spy)
    barriers: list[object] = []
    real_barrier = dist.barrier
    monkeypatch.setattr(checkpoint.dist, "barrier", lambda group=None: barriers.append(group) or real_barrier(group))
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = checkpoint.save(tmp_path, 10, model, optimizer, {}, group=group)
    checkpoint.load(path, model, optimizer, group)
    assert used == [group, group]
    assert barriers == [group, group]
