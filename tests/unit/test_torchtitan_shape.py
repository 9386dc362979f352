"""benchmarks/torchtitan_shape.py, the torchtitan side of the GPU benchmark, up to where a CPU reaches.

torchtitan's trainer needs CUDA, so its run is the GPU benchmark's; here, in .venv-torchtitan (as
scripts/setup makes it), torchtitan 0.2.2 parses the exact arguments the benchmark passes it, and
its train spec ``dtp_llama3`` is checked to be DTP's model and data: every flavor has DTP's
parameter count and RoPE rotations, torchtitan's decoder loaded with DTP's weights gives DTP's
logits, and its dataloader yields DTP's trainer's batches.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from model import MODELS, count_parameters
from train import TrainConfig, batch_for

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-torchtitan" / "bin" / "python"
PROBE = Path(__file__).with_name("torchtitan_probe.py")
BATCHES = 3  # the dataloader's first batches, compared with DTP's trainer's
# Run in .venv-torchtitan: for each flavor of the train spec, whether torchtitan's RoPE rotations (as its decoder
# computes them from the flavor's arguments) are exactly DTP's for the same model.
ROPE_PROBE = """
import json
import torch
import torchtitan_shape
from torchtitan.models.llama3.model.model import precompute_freqs_cis
from torchtitan.protocols.train_spec import get_train_spec
from model import MODELS, rope_frequencies

found = {}
for name, args in get_train_spec(torchtitan_shape.TRAIN_SPEC).model_args.items():
    theirs = precompute_freqs_cis(args.dim // args.n_heads, 4096, args.rope_theta, args.rope_scaling_args)
    found[name] = torch.equal(theirs, rope_frequencies(MODELS[name], 4096))
print(json.dumps(found))
"""

# On CI (``CI`` set), where scripts/setup has made it, a missing .venv-torchtitan fails these tests: no silent skip.
pytestmark = pytest.mark.skipif(
    not PYTHON.exists() and not os.environ.get("CI"),
    reason=".venv-torchtitan is missing (scripts/setup creates it): torchtitan is not available",
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, trainer_mfu: ModuleType) -> dict:
    """What torchtitan makes of the benchmark's 1B shape, compiled and profiled; with the token file and
    shape it was given, and where its dataloader's first batches were kept."""
    bench = trainer_mfu
    shape = bench.GPU_SHAPES[0]
    work = tmp_path_factory.mktemp("torchtitan")
    data = work / "tokens.bin"
    bench.write_tokens(data)
    args = bench.torchtitan_args(bench.Run(shape, data, work, compile=True, profile=True))
    env = {"PYTHONPATH": ":".join(str(p) for p in bench.TORCHTITAN_PATH), "PATH": "/usr/bin:/bin"}
    batches_out = work / "loader_batches.npz"
    done = subprocess.run(
        [str(PYTHON), str(PROBE)],
        input=json.dumps({"args": args, "batches": BATCHES, "batches_out": str(batches_out)}),
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {**found, "given": {"data": data, "shape": shape, "batches_out": batches_out}}


def test_torchtitan_takes_the_benchmark_arguments_as_meant(probe: dict) -> None:
    assert probe["job"] == {
        "model": [probe["train_spec"], "llama3_2_1b"],
        "seq_len": 2048,
        "local_batch_size": 4,
        "steps": 40,
        "mixed_precision_param": "bfloat16",
        "lr": 3e-4,
        "weight_decay": TrainConfig.weight_decay,  # DTP's trainer's
        "warmup_steps": 10,
        "activation_checkpoint": "none",
        "compile": True,
        "log_freq": 1,
        "checkpoint": False,
        "profiled_step": 40,  # the last: its trace lands where the benchmark reads it (iteration_40)
    }


def test_every_dense_dtp_model_is_a_torchtitan_flavor_of_the_same_size(probe: dict) -> None:
    dense = {name: args for name, args in MODELS.items() if not args.n_experts}
    assert probe["models"].keys() == dense.keys()
    for name, args in dense.items():
        assert probe["models"][name] == {"parameters": count_parameters(args), "ffn_dim": args.ffn_dim}, name


def test_every_flavor_rotates_as_dtps_model_does(trainer_mfu: ModuleType) -> None:
    """Llama 3.1 and 3.2 scale RoPE (Meta's "llama3" scaling), the others do not: torchtitan's side of the
    benchmark has the same rotations as DTP's, bit for bit, whichever the model."""
    env = {"PYTHONPATH": ":".join(str(p) for p in trainer_mfu.TORCHTITAN_PATH), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(PYTHON), "-c", ROPE_PROBE], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dense = [name for name, args in MODELS.items() if not args.n_experts]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == dict.fromkeys(dense, True)


def test_torchtitans_decoder_with_dtps_weights_computes_dtps_logits(probe: dict) -> None:
    assert probe["logits_difference"] < 1e-5


def test_torchtitan_reads_dtps_batches_and_refuses_to_start_without_them(probe: dict) -> None:
    """The loader's first batches are those DTP's trainer draws from the benchmark's token file at the
    benchmark's sequence length and micro-batch (rank 0, steps 0, 1, 2): the expectation is built here,
    from what the benchmark passed, not from anything the loader holds."""
    given = probe["given"]
    trainer = TrainConfig(
        model="",
        data_path=str(given["data"]),
        checkpoint_dir="",
        metrics_path="",
        seq_len=given["shape"].seq_len,
        micro_batch=given["shape"].micro_batch,
    )
    tokens = np.fromfile(given["data"], dtype=np.uint8)
    assert probe["batches_yielded"] == BATCHES
    kept = np.load(given["batches_out"])
    assert kept["inputs"].shape == kept["labels"].shape == (BATCHES, trainer.micro_batch, trainer.seq_len)
    for step in range(BATCHES):
        want_inputs, want_labels = batch_for(tokens, trainer, step, 0)
        assert torch.equal(torch.from_numpy(kept["inputs"][step]), want_inputs), step
        assert torch.equal(torch.from_numpy(kept["labels"][step]), want_labels), step
    assert "--training.dataset_path" in probe["missing_data_error"]
