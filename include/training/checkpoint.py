"""Atomic sharded checkpoints with torch.distributed.checkpoint.

Every rank writes its shards into ``tmp-step_N/``; once all ranks are done,
rank 0 writes ``meta.json`` and renames the folder to ``step_N/``, each made
durable (fsync) before the next. A folder named ``step_*`` is therefore always
complete, a torn write is a ``tmp-*`` left behind, and resuming picks the
newest ``step_*``. A ``tmp-step_N`` that already holds its ``meta.json`` is
whole (rank 0 died before the rename): it is promoted, not deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def newest_complete(directory: Path) -> Path | None:
    steps = [p for p in directory.glob("step_*") if (p / "meta.json").exists()]
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _meta_step(path: Path) -> int | None:
    """The step ``path/meta.json`` records; None when it is missing or unreadable (cut short)."""
    try:
        return json.loads((path / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clean_partial(directory: Path) -> None:
    """Promote whole ``tmp-step_N`` folders (meta.json written) to ``step_N``, delete torn ones (rank 0 only,
    before anyone loads)."""
    for partial in directory.glob("tmp-step_*"):
        final = directory / partial.name.removeprefix("tmp-")
        if f"step_{_meta_step(partial)}" == final.name and not final.exists():
            partial.rename(final)
            _fsync(directory)
        else:
            shutil.rmtree(partial, ignore_errors=True)


def save(
    directory: Path, step: int, model, optimizer, extra: dict, keep: int = 2, group: dist.ProcessGroup | None = None
) -> Path:
    """Save ``step`` (see the module's docstring); ``extra`` joins the step in ``meta.json``. ``group``: the process
    group the save's collectives run on (None: the default group), whose timeout must outlast the slowest rank's
    write."""
    tmp = directory / f"tmp-step_{step}"
    final = directory / f"step_{step}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=group)
    dist.barrier(group=group)
    if dist.get_rank() == 0:
        with (tmp / "meta.json").open("w") as fh:
            fh.write(json.dumps({"step": step, **extra}))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(directory)
        for old in sorted(directory.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return final


def load(path: Path, model, optimizer, group: dist.ProcessGroup | None = None) -> dict:
    """Load the checkpoint at ``path`` into ``model`` and ``optimizer`` (``group`` as for ``save``); its meta.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "meta.json").read_text())
