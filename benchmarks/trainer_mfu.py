"""Tokens/s per device, MFU and peak memory of DTP's trainer (include/training/train.py) against
torchtitan, on one device, in one run.

Each shape runs twice on the same byte-token file, for warm-up plus measured steps: DTP's trainer
under torchrun (one process), then torchtitan under torchrun with the same model (its train spec
``dtp_llama3`` in ``benchmarks/torchtitan_shape.py``: the same dimensions, batches, AdamW and
bf16). Each side's figures are the medians of its steps after warm-up: tokens/s/device and MFU,
and its peak memory as the caching allocator reserved it. MFU is DTP's accounting for both sides:
6 x non-embedding parameters plus attention FLOPs per token, against the device's dense bf16 peak
(989 TFLOP/s for an H100 SXM or an H200: NVIDIA's datasheet figures, without sparsity);
torchtitan's own MFU is kept beside it.

    .venv/bin/python benchmarks/trainer_mfu.py                    # GPU: Llama 3.2 1B, then 3B
    .venv/bin/python benchmarks/trainer_mfu.py --compile --profile  # compiled, and where the time goes
    .venv/bin/python benchmarks/trainer_mfu.py --smoke --profile    # CPU: tiny shape, a few steps (CI)

Writes benchmarks/results/trainer_mfu.json (or --out). torchtitan runs from --torchtitan-python
(default .venv-torchtitan, made by scripts/setup) and trains on CUDA devices only: on a CPU its
side is recorded as not run, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "include" / "training")]

from dtp.metrics.framework_logs import torchtitan_records  # noqa: E402
from dtp.metrics.trace import summarize_trace  # noqa: E402
from model import MODELS, flops_per_token  # noqa: E402
from train import peak_flops  # noqa: E402

TRAIN = ROOT / "include" / "training" / "train.py"
OUT = ROOT / "benchmarks" / "results" / "trainer_mfu.json"
TORCHTITAN_PYTHON = ROOT / ".venv-torchtitan" / "bin" / "python"
TORCHTITAN_PATH = [ROOT / "benchmarks", ROOT / "include" / "training"]
DEVICES = 1  # both sides train on one device: the "tokens/s/GPU" on one GPU


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration, the same for both trainers."""

    model: str
    seq_len: int
    micro_batch: int
    precision: str
    warmup_steps: int
    measured_steps: int

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps


GPU_SHAPES = [
    Shape("llama3_2_1b", 2048, 4, "bf16", 10, 30),  # the ~1B recipe
    Shape("llama3_2_3b", 2048, 2, "bf16", 10, 20),  # the largest Llama 3 whose weights, grads and AdamW fit 80 GB
]
SMOKE_SHAPE = Shape("tiny", 64, 4, "fp32", 3, 6)
LR = 3e-4  # both sides' AdamW (betas 0.9/0.95, weight decay 0.1 on both), warmed up over the warm-up steps


@dataclass(frozen=True)
class Run:
    """One side's run of a shape: where it works and with which options."""

    shape: Shape
    data: Path
    work: Path
    compile: bool
    profile: bool


def write_tokens(path: Path) -> None:
    np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8).tofile(path)


def torchrun(python: str) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={DEVICES}"]


def launch(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run one trainer to its end; its output, or a RuntimeError with the output's tail."""
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}:\n{output[-4000:]}")
    return output


def run_dtp(run: Run) -> tuple[list[dict], Path | None]:
    """DTP's trainer's step records, and its profile trace (of step 2, in the warm-up) if asked for."""
    shape = run.shape
    config = {
        "model": shape.model,
        "data_path": str(run.data),
        "checkpoint_dir": str(run.work / "ckpt"),
        "metrics_path": str(run.work / "metrics.jsonl"),
        "seq_len": shape.seq_len,
        "micro_batch": shape.micro_batch,
        "max_steps": shape.steps,
        "checkpoint_interval": shape.steps * 10,
        "final_checkpoint": False,  # no checkpoint at all: torchtitan's side saves none either
        "log_interval": 1,
        "lr": LR,
        "warmup_steps": shape.warmup_steps,
        "precision": shape.precision,
        "compile": run.compile,
        "run_name": "benchmark",
        "profile_steps": 1 if run.profile else 0,
        "profile_dir": str(run.work / "profile"),
    }
    (run.work / "cfg.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    launch([*torchrun(sys.executable), str(TRAIN), "--config", str(run.work / "cfg.json")], env, ROOT)
    lines = (run.work / "metrics.jsonl").read_text().splitlines()
    trace = run.work / "profile" / "trace-rank0.json"
    return [r for r in map(json.loads, lines) if r.get("event") == "step"], trace if run.profile else None


def torchtitan_args(run: Run) -> list[str]:
    """torchtitan.train's arguments for the run: DTP's model and data, one metrics line a step, no
    activation checkpointing (DTP's default), bf16 mixed precision; profiled at its last step if asked."""
    shape = run.shape
    args = [
        "--experimental.custom_import", "torchtitan_shape",
        "--model.name", "dtp_llama3",
        "--model.flavor", shape.model,
        "--training.dataset_path", str(run.data),
        "--training.seq_len", str(shape.seq_len),
        "--training.local_batch_size", str(shape.micro_batch),
        "--training.steps", str(shape.steps),
        "--training.mixed_precision_param", "bfloat16" if shape.precision == "bf16" else "float32",
        "--optimizer.lr", str(LR),
        "--lr_scheduler.warmup_steps", str(shape.warmup_steps),
        "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1",
        "--job.dump_folder", str(run.work),
    ]  # fmt: skip
    if run.compile:
        args.append("--compile.enable")
    if run.profile:
        args += ["--profiling.enable_profiling", "--profiling.profile_freq", str(shape.steps)]
    return args


def run_torchtitan(python: str, run: Run) -> tuple[list[dict], Path | None]:
    """torchtitan's step records, read from its metrics lines, and its profile trace if asked for."""
    path = os.pathsep.join([*map(str, TORCHTITAN_PATH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    output = launch([*torchrun(python), "-m", "torchtitan.train", *torchtitan_args(run)], env, run.work)
    trace = run.work / "profile_traces" / f"iteration_{run.shape.steps}" / "rank0_trace.json"
    return list(torchtitan_records(output.splitlines(), world_size=DEVICES)), trace if run.profile else None


def summarize(records: list[dict], trace: Path | None, shape: Shape, peak: float | None) -> dict:
    """Medians of the steps after warm-up; MFU by DTP's accounting where the device's peak is known."""
    measured = [r for r in records if r["step"] > shape.warmup_steps]
    if not measured:
        raise ValueError(f"no step after the {shape.warmup_steps} warm-up steps was logged")
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in measured) / DEVICES
    summary = {
        "steps_measured": len(measured),
        "tokens_per_s_per_device": round(tokens_per_s, 1),
        "mfu": round(flops_per_token(MODELS[shape.model], shape.seq_len) * tokens_per_s / peak, 4) if peak else None,
        "final_loss": measured[-1]["loss"],
    }
    reported = [r["mfu"] for r in measured if r.get("mfu") is not None]
    if reported:
        summary["mfu_reported"] = round(statistics.median(reported), 4)
    reserved = [r.get("memory_reserved_mb") or r.get("memory_mb") for r in records]
    summary["peak_memory_mb"] = max(m for m in reserved if m is not None)
    if trace is not None:
        summary["profile"] = summarize_trace(json.loads(trace.read_text())) if trace.exists() else "no trace written"
    return summary


def device_peak_flops() -> float | None:
    """The trainer's dense bf16 peak for the first GPU (None on a CPU or an unknown GPU)."""
    return peak_flops(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def device_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def side(measure_run: Callable[[], tuple[list[dict], Path | None]], shape: Shape, peak: float | None) -> dict:
    """One side's summary, or why it failed (an out-of-memory, say), so the other shapes still run."""
    try:
        return {"status": "ran", **summarize(*measure_run(), shape, peak)}
    except (RuntimeError, ValueError) as err:
        return {"status": "failed", "reason": str(err)}


def torchtitan_side(python: str | None, run: Run, peak: float | None) -> dict:
    """torchtitan's summary, or why it was not run."""
    if not torch.cuda.is_available():
        return {"status": "not run", "reason": "torchtitan trains on CUDA devices only"}
    if python is None:
        return {"status": "not run", "reason": f"no torchtitan Python ({TORCHTITAN_PYTHON} is made by scripts/setup)"}
    return side(lambda: run_torchtitan(python, run), run.shape, peak)


def measure(shape: Shape, compile_: bool, profile: bool, torchtitan_python: str | None) -> dict:
    peak = device_peak_flops()
    with tempfile.TemporaryDirectory(prefix="dtp-bench-") as tmp:
        data = Path(tmp) / "tokens.bin"
        write_tokens(data)
        ours_run, theirs_run = (Run(shape, data, Path(tmp) / name, compile_, profile) for name in ("dtp", "torchtitan"))
        for run in (ours_run, theirs_run):
            run.work.mkdir()
        ours = side(lambda: run_dtp(ours_run), shape, peak)
        theirs = torchtitan_side(torchtitan_python, theirs_run, peak)
    both = ours["status"] == theirs["status"] == "ran"
    return {
        "shape": asdict(shape),
        "dtp": ours,
        "torchtitan": theirs,
        "ratio_tokens_per_s": (
            round(ours["tokens_per_s_per_device"] / theirs["tokens_per_s_per_device"], 3) if both else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU: proves the benchmark runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, on both sides")
    parser.add_argument("--profile", action="store_true", help="profile a step on both sides; summarize its time")
    parser.add_argument("--model", action="append", help="only these GPU shapes (by model name)")
    parser.add_argument("--torchtitan-python", help=f"a Python with torchtitan 0.2.2 (default {TORCHTITAN_PYTHON})")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    shapes = [SMOKE_SHAPE] if args.smoke else [s for s in GPU_SHAPES if not args.model or s.model in args.model]
    torchtitan_python = args.torchtitan_python or (str(TORCHTITAN_PYTHON) if TORCHTITAN_PYTHON.exists() else None)
    result = {
        "benchmark": "trainer_mfu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_description(),
        "peak_flops": device_peak_flops(),
        "compile": args.compile,
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:  # the file is rewritten after each shape: a run cut short keeps what it measured
        result["results"].append(measure(shape, args.compile, args.profile, torchtitan_python))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
