"""Real 2-process CPU training runs of include/training/train.py under torchrun (gloo).

Four runs in all: an uninterrupted 40-step run, and, at the same time, the same config in another
directory that fails at step 25 (DTP_FAIL_AT_STEP) and is then resumed with its ``step_20`` turned
back into the ``tmp-step_20`` a rank 0 dead before the rename leaves and a torn ``tmp-step_30`` left
in its checkpoint directory; beside the resume, the uninterrupted run's config with the GPU path's
options on (each block compiled and activation-checkpointed). Batches depend on the step and rank only,
so the resumed and the optimized runs must log the losses of the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from trainer_support import (
    LOG_EVERY,
    MAX_STEPS,
    PROJECT_ROOT,
    TRAIN,
    Run,
    corpus,
    describe,
    finish,
    make_run,
    start,
)

from dtp.metrics.trace import summarize_trace
from heartbeat import heartbeat
from model import MODELS, count_parameters
from train import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("trainer")
    data = corpus(root / "train.bin", 200)
    full, resumed = make_run(root / "full", data, profile_steps=2), make_run(root / "resumed", data)
    # The uninterrupted run and the run that dies at step 25 go side by side.
    procs = [(full, start(full)), (resumed, start(resumed, fail_at=25))]
    for run, proc in procs:
        finish(run, proc)
    # What the failed run left, before the resume is started.
    resumed.after_failure = {
        "names": sorted(p.name for p in resumed.checkpoints.iterdir()),
        "summary": resumed.summary,
    }
    # Rank 0 died after step_20's meta.json, before the rename; a save at step 30 was cut short.
    (resumed.checkpoints / "step_20").rename(resumed.checkpoints / "tmp-step_20")
    torn = resumed.checkpoints / "tmp-step_30"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"garbage")
    # The resume goes beside the optimized run.
    optimized = make_run(root / "optimized", data, compile=True, activation_checkpointing=True)
    procs = [(resumed, start(resumed)), (optimized, start(optimized))]
    for run, proc in procs:
        finish(run, proc)
    return {"full": full, "resumed": resumed, "optimized": optimized}


def test_full_run_trains(runs: dict[str, Run]) -> None:
    run = runs["full"]
    [result] = run.results
    assert result.returncode == 0, describe(result)
    summary = run.summary
    assert summary.steps == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))
    assert summary.finished
    assert summary.restarts == 0
    assert summary.world_size == 2
    assert summary.params == count_parameters(MODELS["tiny"])
    assert summary.checkpoints == [20, 40]
    # Byte-level text starts near ln(256) = 5.5; 40 steps must bring it well down.
    assert summary.first_loss > summary.final_loss + 0.5, summary.losses
    assert min(summary.losses[-3:]) < min(summary.losses[:2])
    assert summary.median_tokens_per_s > 0


def test_full_run_step_lines(runs: dict[str, Run]) -> None:
    records = runs["full"].records
    assert records[0]["event"] == "start"
    assert records[0]["resumed_from_step"] is None
    assert records[-1]["event"] == "end" and records[-1]["step"] == MAX_STEPS
    steps = [r for r in records if r["event"] == "step"]
    for record in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "memory_mb"} <= set(record)
        assert record["tokens_per_s"] == pytest.approx(2 * record["tokens_per_s_per_device"], rel=1e-3)
        assert record["mfu"] is None  # no known peak FLOPs on CPU
        assert record["max_steps"] == MAX_STEPS and record["eta_s"] >= 0
    assert steps[-1]["eta_s"] == 0 and steps[0]["eta_s"] > 0


def test_full_run_checkpoints_are_complete(runs: dict[str, Run]) -> None:
    ckpt = runs["full"].checkpoints
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_20", "step_40"]
    for step in (20, 40):
        meta = json.loads((ckpt / f"step_{step}" / "meta.json").read_text())
        assert meta["step"] == step and meta["lr_schedule_steps"] == MAX_STEPS
        assert meta["samples_seen"] == step * 2 * 8  # 2 ranks x micro_batch 8 a step
        assert meta["loss"] > 0
        assert list((ckpt / f"step_{step}").glob("*.distcp")), "no shard written"
    assert not list(ckpt.glob("tmp-*"))


def test_injected_failure_leaves_the_last_complete_checkpoint(runs: dict[str, Run]) -> None:
    run = runs["resumed"]
    failed = run.results[0]
    assert failed.returncode != 0
    assert "injected failure at step 25 (DTP_FAIL_AT_STEP)" in failed.stdout + failed.stderr
    assert run.after_failure["names"] == ["step_20"]
    assert run.after_failure["summary"].steps == [5, 10, 15, 20]
    assert not run.after_failure["summary"].finished


def test_resume_promotes_the_whole_tmp_checkpoint_deletes_the_torn_one_and_continues_from_step_20(
    runs: dict[str, Run],
) -> None:
    run = runs["resumed"]
    resumed = run.results[1]
    assert resumed.returncode == 0, describe(resumed)
    assert not list(run.checkpoints.glob("tmp-*"))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_20", "step_40"]
    starts = [r for r in run.records if r["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 20]
    summary = run.summary
    assert summary.restarts == 1
    assert summary.finished
    assert summary.steps == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))
    assert summary.checkpoints == [20, 40]


def test_resumed_run_reproduces_the_uninterrupted_losses(runs: dict[str, Run]) -> None:
    full, resumed = runs["full"].losses(), runs["resumed"].losses()
    assert resumed[40] == pytest.approx(full[40], abs=1e-4)
    for step in range(25, MAX_STEPS + 1, LOG_EVERY):
        assert resumed[step] == pytest.approx(full[step], abs=1e-4), step
    full_lr = {r["step"]: r["lr"] for r in runs["full"].records if r["event"] == "step"}
    resumed_lr = {r["step"]: r["lr"] for r in runs["resumed"].records if r["event"] == "step"}
    assert resumed_lr == full_lr


def test_profiled_steps_leave_a_chrome_trace_per_rank(runs: dict[str, Run]) -> None:
    full = runs["full"]
    [event] = [r for r in full.records if r["event"] == "profile"]
    assert event["steps"] == [2, 3]
    for rank in (0, 1):
        trace = json.loads((full.directory / "profile" / f"trace-rank{rank}.json").read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert not (runs["resumed"].directory / "profile").exists()  # profile_steps 0: nothing written


def test_compiled_checkpointed_blocks_train_as_the_eager_model(runs: dict[str, Run]) -> None:
    run = runs["optimized"]
    [result] = run.results
    assert result.returncode == 0, describe(result)
    assert run.records[-1]["event"] == "end" and run.records[-1]["config"]["compile"] is True
    full, optimized = runs["full"].losses(), run.losses()
    assert optimized.keys() == full.keys()
    for step, loss in full.items():  # compiled kernels order their float sums otherwise: equal to 0.1%
        assert optimized[step] == pytest.approx(loss, rel=1e-3), step


def test_compiled_checkpointed_runs_save_the_plain_parameter_names(runs: dict[str, Run]) -> None:
    """A checkpoint written with the blocks wrapped loads into the plain model, and the other way round."""

    def names(run: Run) -> set[str]:
        return set(dcp.FileSystemReader(str(run.checkpoints / "step_40")).read_metadata().state_dict_metadata)

    assert names(runs["optimized"]) == names(runs["full"])


def test_a_profiled_window_is_summarized_by_kind_of_work(runs: dict[str, Run]) -> None:
    trace = json.loads((runs["full"].directory / "profile" / "trace-rank0.json").read_text())
    # Every operator by name: which of them make the top 8 depends on how loaded the machine was.
    summary = summarize_trace(trace, top=len(trace["traceEvents"]))
    assert summary["source"] == "host operators"
    assert 0 < summary["busy_ms"] <= summary["span_ms"]
    # Two CPU ranks under FSDP: matrix products and gloo's collectives are both in the window.
    assert summary["by_kind_ms"]["matmul"] > 0 and summary["by_kind_ms"]["communication"] > 0
    assert "aten::mm" in summary["top_ms"]


def test_a_resume_to_more_steps_keeps_the_lr_schedule_it_started_with(runs: dict[str, Run], tmp_path: Path) -> None:
    """The full run's cosine schedule ended at step 40, at 0.1 * lr: resumed up to step 44, the LR stays there
    rather than jumping back up a schedule stretched to 44 steps."""
    full = runs["full"]
    longer = make_run(
        tmp_path / "longer", Path(json.loads(full.config.read_text())["data_path"]), max_steps=44, log_interval=1
    )
    shutil.copytree(full.checkpoints / "step_40", longer.checkpoints / "step_40")
    result = finish(longer, start(longer))
    assert result.returncode == 0, describe(result)
    cfg = TrainConfig.load(str(full.config))
    lrs = {r["step"]: r["lr"] for r in longer.records if r["event"] == "step"}
    assert lrs == {step: pytest.approx(0.1 * cfg.lr) for step in range(41, 45)}
    [kept] = [r for r in longer.records if r["event"] == "lr_schedule_kept"]
    assert (kept["schedule_steps"], kept["max_steps"]) == (MAX_STEPS, 44)


def test_a_run_whose_weights_stop_being_finite_stops_before_it_saves_them(runs: dict[str, Run], tmp_path: Path) -> None:
    """Resumed from the full run's step 40 with an absurd learning rate, step 41's update makes the gradient norm
    NaN at step 42, a checkpoint step: the run fails there without saving, says so in its metrics, and its newest
    checkpoint is still step 40."""
    full = runs["full"]
    data = Path(json.loads(full.config.read_text())["data_path"])
    blown = make_run(tmp_path / "blown", data, max_steps=50, lr=1e5, log_interval=1, checkpoint_interval=2)
    shutil.copytree(full.checkpoints / "step_40", blown.checkpoints / "step_40")
    result = finish(blown, start(blown))
    assert result.returncode != 0, describe(result)
    assert "the newest checkpoint, step_40, is from before" in result.stderr, describe(result)
    [diverged] = [r for r in blown.records if r["event"] == "diverged"]
    assert (diverged["step"], diverged["grad_norm"]) == (42, "nan")
    assert sorted(p.name for p in blown.checkpoints.iterdir()) == ["step_40"]
    assert blown.summary.diverged_at == diverged["step"]


def test_without_a_final_checkpoint_a_run_saves_only_at_its_interval(runs: dict[str, Run], tmp_path: Path) -> None:
    """The benchmark's setting: what it measures is steps, and torchtitan's side saves nothing."""
    data = Path(json.loads(runs["full"].config.read_text())["data_path"])
    bench = make_run(tmp_path / "bench", data, max_steps=6, checkpoint_interval=4, final_checkpoint=False)
    result = finish(bench, start(bench))
    assert result.returncode == 0, describe(result)
    assert bench.summary.finished and bench.summary.checkpoints == [4]
    assert sorted(p.name for p in bench.checkpoints.iterdir()) == ["step_4"]


def test_the_stop_file_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path: Path) -> None:
    """The file the Slurm batch script creates when Slurm signals it ahead of the time limit: the ranks stop and
    save as on SIGTERM, without torchrun's 30 s hanging over the save."""
    data = corpus(tmp_path / "train.bin", 64)
    stop = tmp_path / "train.stop"
    run = make_run(
        tmp_path / "run", data, max_steps=10_000, checkpoint_interval=10_000, log_interval=1, stop_file=str(stop)
    )
    proc = start(run)
    deadline = time.monotonic() + 180
    while not (run.directory / "metrics.jsonl").exists() or len(run.summary.steps) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, describe(finish(run, proc))
        time.sleep(0.2)
    stop.touch()
    result = finish(run, proc)
    assert result.returncode != 0
    [preempted] = [r for r in run.records if r["event"] == "preempted"]
    stopped = preempted["step"]
    assert 3 <= stopped < 10_000, describe(result)
    assert run.summary.checkpoints == [stopped]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [f"step_{stopped}"]


def test_a_resume_on_fewer_ranks_continues_after_the_samples_the_checkpoint_saw(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    """The full run's step_20 was saved by 2 ranks (320 samples); resumed on one rank, the data continues at
    sample 320, not at 20 x 1 x 8 = 160 (which would repeat samples)."""
    full = runs["full"]
    data = Path(json.loads(full.config.read_text())["data_path"])
    single = make_run(tmp_path / "single", data, max_steps=22, log_interval=1)
    shutil.copytree(full.checkpoints / "step_20", single.checkpoints / "step_20")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(TRAIN)]
    proc = subprocess.Popen(
        [*argv, "--config", str(single.config)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    result = finish(single, proc)
    assert result.returncode == 0, describe(result)
    [started] = [r for r in single.records if r["event"] == "start"]
    assert (started["resumed_from_step"], started["resumed_from_samples"], started["world_size"]) == (20, 320, 1)
    meta = json.loads((single.checkpoints / "step_22" / "meta.json").read_text())
    assert meta["samples_seen"] == 320 + 2 * 8


def test_a_long_save_or_load_keeps_printing_so_it_is_not_taken_for_a_hang(capsys: pytest.CaptureFixture[str]) -> None:
    with heartbeat("saving the checkpoint of step 500", every=0.05):
        time.sleep(0.18)
    beats = capsys.readouterr().out.splitlines()
    assert len(beats) >= 2 and all(line.startswith("saving the checkpoint of step 500: ") for line in beats)
    time.sleep(0.1)
    assert capsys.readouterr().out == ""  # it stops with the block
