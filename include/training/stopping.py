"""Stopping a training run before its last step, every rank after the same step.

A run asked to stop saves a checkpoint after the step it is in and exits with 143. Two things ask: SIGTERM (a Slurm
time limit or preemption, a Kubernetes eviction: torchrun forwards it to its workers and kills them 30 s later), and
``stop_file`` appearing (the Slurm batch script creates it when Slurm signals it ahead of the job's time limit, early
enough for a save that would not fit in SIGTERM's 30 s). A run whose weights stop being finite stops without a save.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

import checkpoint
from metrics_log import emit

_sigterm = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _sigterm
    _sigterm = True


def catch_sigterm() -> None:
    """Make SIGTERM ask the run to stop (``stop_requested``) instead of ending this process."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def stop_requested(group: dist.ProcessGroup | None, stop_file: str) -> bool:
    """Whether any rank got SIGTERM or rank 0 finds ``stop_file`` (the one that looks, as all would see it): they
    all stop after the same step, so they agree on it (every ``stop_check_steps``). ``group`` is a gloo group on
    the CPU, so the check never waits for the GPU's queued kernels (None: the default group, itself gloo on the
    CPU)."""
    asked = _sigterm or (dist.get_rank() == 0 and bool(stop_file) and os.path.exists(stop_file))
    flag = torch.tensor([float(asked)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def exit_preempted(step: int, metrics_path: Path, rank: int) -> NoReturn:
    """End a run that was asked to stop, once the checkpoint of ``step`` is saved."""
    if rank == 0:
        emit({"event": "preempted", "step": step, "time": time.time()}, metrics_path)
    dist.destroy_process_group()
    sys.exit(143)  # 128 + SIGTERM: what the job would have reported had the signal killed it


class Diverged(RuntimeError):
    """The gradient norm stopped being finite: the optimizer step made the weights NaN or infinite."""


def diverged(step: int, norm: float, ckpt_dir: Path, metrics_path: Path, rank: int) -> NoReturn:
    """Stop a run whose weights are lost, before they replace a good checkpoint. Every rank sees the same norm (it
    is the whole model's), so they all stop at the same step. A relaunch resumes from the newest checkpoint: a fault
    that made the NaN passes, a divergence happens again (the batches depend on the step) until the job's
    attempts are spent."""
    if rank == 0:
        emit({"event": "diverged", "step": step, "grad_norm": str(norm), "time": time.time()}, metrics_path)
    newest = checkpoint.newest_complete(ckpt_dir)
    raise Diverged(
        f"step {step}: the gradient norm is {norm}, so the weights are no longer finite (training diverged); "
        + (f"the newest checkpoint, {newest.name}, is from before" if newest else "no checkpoint was saved")
    )
