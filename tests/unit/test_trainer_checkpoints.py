"""The trainer's checkpoints: how a save is made durable, what a resume finds after a crash, and the checkpoint
a SIGTERM (a time limit, a preemption, an eviction) leaves, from which a resume continues."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from trainer_support import corpus, describe, finish, make_run, start

import checkpoint


def test_clean_partial_promotes_whole_tmp_folders_and_deletes_torn_ones(tmp_path: Path) -> None:
    def step(name: str, meta: str | None) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"x")
        if meta is not None:
            (tmp_path / name / "meta.json").write_text(meta)

    step("step_10", '{"step": 10}')
    step("tmp-step_10", '{"step": 10}')  # step_10 is there already: a leftover
    step("tmp-step_20", '{"step": 20, "loss": 1.5}')  # whole: rank 0 died before the rename
    step("tmp-step_30", None)  # a save cut short
    step("tmp-step_40", '{"st')  # meta.json cut short
    checkpoint.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_20"]
    assert json.loads((tmp_path / "step_20" / "meta.json").read_text()) == {"step": 20, "loss": 1.5}
    assert checkpoint.newest_complete(tmp_path) == tmp_path / "step_20"


def test_a_save_makes_meta_json_and_the_rename_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.json and its folder are fsynced before the rename, the checkpoint folder after it."""
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    synced: list[tuple[str, bool]] = []  # (path, whether step_10 exists yet)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "step_10").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 3)
        checkpoint.save(tmp_path, 10, model, torch.optim.AdamW(model.parameters()), {"loss": 1.0})
    finally:
        dist.destroy_process_group()
    tmp = tmp_path / "tmp-step_10"
    ours = [entry for entry in synced if entry[0] in (str(tmp / "meta.json"), str(tmp), str(tmp_path))]
    assert ours == [(str(tmp / "meta.json"), False), (str(tmp), False), (str(tmp_path), True)]


def test_sigterm_saves_the_step_it_stopped_at_and_a_resume_continues_from_it(tmp_path: Path) -> None:
    """SIGTERM to torchrun (what Slurm's time limit or preemption and a Kubernetes eviction send; torchrun forwards
    it to its workers): both ranks stop after the same step, save it although it is no checkpoint step, and exit."""
    data = corpus(tmp_path / "train.bin", 64)
    run = make_run(tmp_path / "run", data, max_steps=10_000, checkpoint_interval=10_000, log_interval=1)
    proc = start(run)
    deadline = time.monotonic() + 180
    while not (run.directory / "metrics.jsonl").exists() or len(run.summary.steps) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, describe(finish(run, proc))
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    result = finish(run, proc)
    assert result.returncode != 0
    [preempted] = [r for r in run.records if r["event"] == "preempted"]
    stopped = preempted["step"]
    assert 3 <= stopped < 10_000, describe(result)
    assert run.summary.steps == list(range(1, stopped + 1)) and run.summary.checkpoints == [stopped]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [f"step_{stopped}"]
    assert json.loads((run.checkpoints / f"step_{stopped}" / "meta.json").read_text())["step"] == stopped

    run.config.write_text(json.dumps({**json.loads(run.config.read_text()), "max_steps": stopped + 2}))
    resumed = finish(run, start(run))
    assert resumed.returncode == 0, describe(resumed)
    assert [r["resumed_from_step"] for r in run.records if r["event"] == "start"] == [None, stopped]
    assert run.summary.steps == list(range(1, stopped + 3)) and run.summary.finished
