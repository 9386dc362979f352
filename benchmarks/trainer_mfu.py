"""Tokens/s per device, MFU and peak memory of DTP's trainer (include/training/train.py) on one device.

Runs the real trainer under torchrun (one process) for warm-up plus measured steps, on random
byte tokens, and reads its own JSON step lines: the median tokens/s/device and MFU of the steps
after warm-up, and the peak memory. MFU is the trainer's accounting: 6 x non-embedding parameters
plus attention FLOPs per token, against the device's dense bf16 peak (989 TFLOP/s for an H100
SXM, NVIDIA's datasheet figure without sparsity).

    .venv/bin/python benchmarks/trainer_mfu.py                 # GPU: Llama 3.2 1B shape, bf16
    .venv/bin/python benchmarks/trainer_mfu.py --smoke         # CPU: tiny shape, a few steps (CI)

Writes benchmarks/results/trainer_mfu.json (or --out). The torchtitan side of the comparison
needs a GPU and its own virtualenv; on CPU it is recorded as not run, with the reason.
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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "include" / "training" / "train.py"
OUT = ROOT / "benchmarks" / "results" / "trainer_mfu.json"
SHAPES = {
    # name: model, seq_len, micro_batch, precision, warm-up steps, measured steps
    "gpu": ("llama3_2_1b", 2048, 4, "bf16", 10, 30),
    "smoke": ("tiny", 64, 4, "fp32", 3, 6),
}


def run_trainer(model: str, seq_len: int, micro_batch: int, precision: str, steps: int, compile_: bool) -> list[dict]:
    """The trainer's step records for one run of ``steps`` steps."""
    with tempfile.TemporaryDirectory(prefix="dtp-bench-") as tmp:
        work = Path(tmp)
        data = work / "tokens.bin"
        np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8).tofile(data)
        config = {
            "model": model,
            "data_path": str(data),
            "checkpoint_dir": str(work / "ckpt"),
            "metrics_path": str(work / "metrics.jsonl"),
            "seq_len": seq_len,
            "micro_batch": micro_batch,
            "max_steps": steps,
            "checkpoint_interval": steps * 10,  # a final checkpoint only, after the measured steps
            "log_interval": 1,
            "precision": precision,
            "compile": compile_,
            "run_name": "benchmark",
        }
        (work / "cfg.json").write_text(json.dumps(config))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        subprocess.run([*argv, str(TRAIN), "--config", str(work / "cfg.json")], env=env, check=True, cwd=ROOT)
        lines = (work / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "step"]


def summarize(records: list[dict], warmup: int) -> dict:
    measured = [r for r in records if r["step"] > warmup]
    if not measured:
        raise ValueError(f"no step after the {warmup} warm-up steps was logged")
    mfu = [r["mfu"] for r in measured if r.get("mfu") is not None]
    return {
        "steps_measured": len(measured),
        "tokens_per_s_per_device": round(statistics.median(r["tokens_per_s_per_device"] for r in measured), 1),
        "mfu": round(statistics.median(mfu), 4) if mfu else None,
        "peak_memory_mb": max(r["memory_mb"] for r in records),
        "final_loss": measured[-1]["loss"],
    }


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU: proves the benchmark runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model, seq_len, micro_batch, precision, warmup, measured = SHAPES["smoke" if args.smoke else "gpu"]
    records = run_trainer(model, seq_len, micro_batch, precision, warmup + measured, args.compile)
    ours = summarize(records, warmup)
    result = {
        "benchmark": "trainer_mfu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_description(),
        "shape": {"model": model, "seq_len": seq_len, "micro_batch": micro_batch, "precision": precision},
        "warmup_steps": warmup,
        "compile": args.compile,
        "dtp": ours,
        "torchtitan": {"status": "not run", "reason": "needs a GPU and torchtitan 0.3.0 in its own virtualenv"},
        "ratio_tokens_per_s": None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
