"""Real 2-process CPU training runs of include/training/train.py under torchrun (gloo).

Four runs in all: an uninterrupted 40-step run, and, at the same time, the same config in another
directory that fails at step 25 (DTP_FAIL_AT_STEP) and is then resumed with its ``step_20`` turned
back into the ``tmp-step_20`` a rank 0 dead before the rename leaves and a torn ``tmp-step_30`` left
in its checkpoint directory; beside the resume, the uninterrupted run's config with the GPU path's
options on (each block compiled and activation-checkpointed). Batches are seeded by (step, rank),
so the resumed and the optimized runs must log the losses of the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import checkpoint
from dtp.metrics.parse import TrainingSummary, summarize
from dtp.metrics.trace import summarize_trace
from model import MODELS, count_parameters
from train import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CORPUS = PROJECT_ROOT / "include" / "data" / "corpus.txt"
TRAIN = PROJECT_ROOT / "include" / "training" / "train.py"
MAX_STEPS, INTERVAL, LOG_EVERY = 40, 20, 5


@dataclass
class Run:
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("trainer")
    data = root / "train.bin"
    data.write_bytes(CORPUS.read_bytes()[: 200 * 1024])
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


def test_full_run_checkpoints_are_complete(runs: dict[str, Run]) -> None:
    ckpt = runs["full"].checkpoints
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_20", "step_40"]
    for step in (20, 40):
        meta = json.loads((ckpt / f"step_{step}" / "meta.json").read_text())
        assert meta["step"] == step and meta["lr_schedule_steps"] == MAX_STEPS
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
    for step, loss in full.items():
        assert optimized[step] == pytest.approx(loss, abs=1e-3), step


def test_compiled_checkpointed_runs_save_the_plain_parameter_names(runs: dict[str, Run]) -> None:
    """A checkpoint written with the blocks wrapped loads into the plain model, and the other way round."""

    def names(run: Run) -> set[str]:
        return set(dcp.FileSystemReader(str(run.checkpoints / "step_40")).read_metadata().state_dict_metadata)

    assert names(runs["optimized"]) == names(runs["full"])


def test_a_profiled_window_is_summarized_by_kind_of_work(runs: dict[str, Run]) -> None:
    trace = json.loads((runs["full"].directory / "profile" / "trace-rank0.json").read_text())
    summary = summarize_trace(trace)
    assert summary["source"] == "host operators"
    assert 0 < summary["busy_ms"] <= summary["span_ms"]
    # Two CPU ranks under FSDP: matrix products and gloo's collectives are both in the window.
    assert summary["by_kind_ms"]["matmul"] > 0 and summary["by_kind_ms"]["communication"] > 0
    assert "aten::mm" in summary["top_ms"]


def test_a_mixture_of_experts_trains_on_two_ranks_and_compiled_as_eager(tmp_path: Path) -> None:
    """Two ranks route their tokens to different experts; FSDP still reduce-scatters the same gradients on both
    (it failed with a collective mismatch when an expert had no token on one rank). The experts' routing has
    data-dependent shapes: compiled, a MoE block's graph breaks there rather than refusing."""
    data = tmp_path / "train.bin"
    data.write_bytes(CORPUS.read_bytes()[: 64 * 1024])
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


def test_a_run_that_requires_cuda_fails_at_once_where_torch_cannot_use_it(tmp_path: Path) -> None:
    data = tmp_path / "train.bin"
    data.write_bytes(CORPUS.read_bytes()[: 16 * 1024])
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


def test_sigterm_saves_the_step_it_stopped_at_and_a_resume_continues_from_it(tmp_path: Path) -> None:
    """SIGTERM to torchrun (what Slurm's time limit or preemption and a Kubernetes eviction send; torchrun forwards
    it to its workers): both ranks stop after the same step, save it although it is no checkpoint step, and exit."""
    data = tmp_path / "train.bin"
    data.write_bytes(CORPUS.read_bytes()[: 64 * 1024])
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
