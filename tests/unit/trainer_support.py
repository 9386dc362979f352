"""Helpers for the trainer's tests: runs of include/training/train.py under torchrun (2 CPU processes, gloo),
each in a directory of its own with its config, metrics and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtp.metrics.parse import TrainingSummary, summarize

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CORPUS = PROJECT_ROOT / "include" / "data" / "corpus.txt"
TRAIN = PROJECT_ROOT / "include" / "training" / "train.py"
MAX_STEPS, INTERVAL, LOG_EVERY = 40, 20, 5


@dataclass
class Run:
    """A training run's directory and config, the results of its torchrun invocations, and what it wrote."""

    directory: Path
    config: Path
    results: list[subprocess.CompletedProcess] = field(default_factory=list)
    after_failure: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def records(self) -> list[dict]:
        lines = (self.directory / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def summary(self) -> TrainingSummary:
        return summarize((self.directory / "metrics.jsonl").read_text().splitlines())

    def losses(self) -> dict[int, float]:
        return dict(zip(self.summary.steps, self.summary.losses, strict=True))


def make_run(directory: Path, data: Path, profile_steps: int = 0, **options: Any) -> Run:
    """A run of the tiny model for MAX_STEPS steps; ``options`` replace or add to its config's entries."""
    directory.mkdir()
    config = {
        "model": "tiny",
        "data_path": str(data),
        "checkpoint_dir": str(directory / "checkpoints"),
        "metrics_path": str(directory / "metrics.jsonl"),
        "seq_len": 64,
        "micro_batch": 8,
        "max_steps": MAX_STEPS,
        "checkpoint_interval": INTERVAL,
        "log_interval": LOG_EVERY,
        "run_name": directory.name,
        "profile_steps": profile_steps,
        "profile_dir": str(directory / "profile"),
        **options,
    }
    path = directory / "cfg.json"
    path.write_text(json.dumps(config))
    return Run(directory, path)


def start(run: Run, fail_at: int | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DTP_FAIL_AT_STEP"}
    env["OMP_NUM_THREADS"] = "1"
    if fail_at:
        env["DTP_FAIL_AT_STEP"] = str(fail_at)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*argv, str(TRAIN), "--config", str(run.config)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run: Run, proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    run.results.append(result)
    return result


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


def corpus(path: Path, kib: int) -> Path:
    """The first ``kib`` KiB of the shipped corpus at ``path``: a byte-level training file."""
    path.write_bytes(CORPUS.read_bytes()[: kib * 1024])
    return path
