"""Atomic sharded checkpoints with torch.distributed.checkpoint.

Every rank writes its shards into ``tmp-step_N/``; once all ranks are done,
rank 0 writes ``meta.json`` and renames the folder to ``step_N/``. A folder
named ``step_*`` is therefore always complete, a torn write is a ``tmp-*``
left behind, and resuming picks the newest ``step_*``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def newest_complete(directory: Path) -> Path | None:
    steps = [p for p in directory.glob("step_*") if (p / "meta.json").exists()]
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def clean_partial(directory: Path) -> None:
    """Delete torn checkpoints (rank 0 only, before anyone loads)."""
    for partial in directory.glob("tmp-step_*"):
        shutil.rmtree(partial, ignore_errors=True)


def save(directory: Path, step: int, model, optimizer, extra: dict, keep: int = 2) -> Path:
    tmp = directory / f"tmp-step_{step}"
    final = directory / f"step_{step}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **extra}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(directory.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "meta.json").read_text())
