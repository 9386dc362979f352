"""The trainer's models on two CPU ranks: a mixture of experts trains (compiled too), a model initialised sharded
is the one its seed makes whole, and a run that needs CUDA fails at once where torch cannot use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_support import PROJECT_ROOT, TRAIN, corpus, describe, finish, make_run, start

from model import MODELS


def test_a_mixture_of_experts_trains_on_two_ranks_and_compiled_as_eager(tmp_path: Path) -> None:
    """Two ranks route their tokens to different experts; FSDP still reduce-scatters the same gradients on both
    (it failed with a collective mismatch when an expert had no token on one rank). The experts' routing has
    data-dependent shapes: compiled, a MoE block's graph breaks there rather than refusing."""
    data = corpus(tmp_path / "train.bin", 64)
    losses = {}
    for compiled in (False, True):
        run = make_run(
            tmp_path / f"compiled-{compiled}", data, model="tiny_moe", max_steps=4, log_interval=2, compile=compiled
        )
        result = finish(run, start(run))
        assert result.returncode == 0, describe(result)
        losses[compiled] = run.losses()
    assert losses[True].keys() == losses[False].keys() == {2, 4}
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, abs=1e-3), step


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_the_sharded_model_starts_as_the_one_its_seed_makes_whole(tmp_path: Path, model: str) -> None:
    """The trainer builds its model on the meta device and initialises it sharded (a 70B model whole would not fit
    one GPU); each rank's shards are those of the model the seed makes on one device, the RoPE table too."""
    out = tmp_path / "init.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*argv, str(Path(__file__).with_name("sharded_init_probe.py")), model, str(out)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, describe(result)
    probe = json.loads(out.read_text())
    assert len(probe["differences"]) == len(probe["local_shapes"]) + 1  # every parameter, and the RoPE table
    assert max(probe["differences"].values()) == 0.0, probe["differences"]
    args = MODELS[model]
    assert probe["local_shapes"]["tok_embeddings.weight"] == [args.vocab_size // 2, args.dim]  # a half per rank


def test_a_run_that_requires_cuda_fails_at_once_where_torch_cannot_use_it(tmp_path: Path) -> None:
    data = corpus(tmp_path / "train.bin", 16)
    run = make_run(tmp_path / "gpu", data, device="cuda")
    result = subprocess.run(
        [sys.executable, str(TRAIN), "--config", str(run.config)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # what a node whose driver torch cannot use looks like
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "device 'cuda' is required but torch" in result.stderr, describe(result)
    assert not (run.directory / "metrics.jsonl").exists()
