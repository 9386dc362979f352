"""dtp.metrics.parse and dtp.metrics.gates: summaries of noisy logs, and gate messages with numbers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dtp.metrics.gates import training_failures
from dtp.metrics.parse import TrainingSummary, json_records, summarize


def step(n: int, loss: float, tps: float = 1000.0, **extra: Any) -> str:
    return json.dumps({"event": "step", "step": n, "loss": loss, "tokens_per_s": tps, **extra})


def start(**extra: Any) -> str:
    return json.dumps({"event": "start", "params": 459392, "world_size": 2, **extra})


# --- parse ------------------------------------------------------------------------------------------


def test_json_records_skip_noise_and_strip_srun_prefixes() -> None:
    lines = [
        "WARNING:torch.distributed.run:*****",
        "0: " + start(),
        "1: not json {at all",
        '{"no_event": true}',
        "[1, 2, 3]",
        '"{"',
        "",
        "srun: error: n2: task 1: Exited with exit code 1",
        "0: " + step(1, 5.0),
    ]
    records = list(json_records(lines))
    assert [r["event"] for r in records] == ["start", "step"]


def test_summarize_noisy_log() -> None:
    lines = [
        "+ srun --kill-on-bad-exit=1 python -m torch.distributed.run",
        "0: " + start(),
        "0: " + step(1, 5.5, 100.0, memory_mb=300.0, mfu=None),
        "torchrun banner",
        "0: " + step(2, 4.0, 900.0, memory_mb=420.5, mfu=0.31),
        "1: {broken json",
        step(3, 3.0, 1100.0, memory_mb=410.0, mfu=0.33),
        "0: " + json.dumps({"event": "checkpoint", "step": 3, "path": "/x/step_3"}),
        "0: " + json.dumps({"event": "end", "step": 3}),
    ]
    s = summarize(lines)
    assert s.steps == [1, 2, 3]
    assert s.losses == [5.5, 4.0, 3.0]
    assert s.tokens_per_s == [100.0, 900.0, 1100.0]
    assert s.checkpoints == [3]
    assert s.restarts == 0
    assert (s.params, s.world_size) == (459392, 2)
    assert s.max_memory_mb == 420.5
    assert s.mfu == 0.32  # the median over the windows after the first
    assert s.finished
    assert (s.first_loss, s.final_loss) == (5.5, 3.0)
    d = s.as_dict()
    assert d["last_step"] == 3 and d["final_loss"] == 3.0 and d["median_tokens_per_s"] == 1000.0


def test_resumed_run_latest_value_wins_and_restarts_are_counted() -> None:
    lines = [
        start(),
        step(5, 4.0),
        step(10, 3.5),
        json.dumps({"event": "checkpoint", "step": 10}),
        step(15, 3.4),  # lost: the run died before the next checkpoint
        start(resumed_from_step=10),
        step(15, 3.3),
        step(20, 3.1),
        start(resumed_from_step=10),
        step(15, 3.2),
        step(20, 3.0),
        json.dumps({"event": "checkpoint", "step": 20}),
        json.dumps({"event": "end", "step": 20}),
    ]
    s = summarize(lines)
    assert s.steps == [5, 10, 15, 20]
    assert s.losses == [4.0, 3.5, 3.2, 3.0]
    assert s.restarts == 2
    assert s.checkpoints == [10, 20]
    assert s.finished


def test_steps_out_of_order_are_sorted() -> None:
    s = summarize([step(3, 1.0), step(1, 3.0), step(2, 2.0)])
    assert s.steps == [1, 2, 3]
    assert s.losses == [3.0, 2.0, 1.0]


def test_median_tokens_per_s_leaves_out_the_first_window() -> None:
    s = summarize([step(1, 5.0, 10.0), step(2, 4.0, 1000.0), step(3, 3.0, 2000.0), step(4, 2.0, 3000.0)])
    assert s.median_tokens_per_s == 2000.0  # with the first window it would be 1500


def test_the_first_window_after_a_resume_is_a_warm_up_too() -> None:
    lines = [
        start(),
        step(1, 5.0, 10.0, mfu=0.01),
        step(2, 4.0, 1000.0, mfu=0.30),
        step(3, 3.9, 1100.0, mfu=0.33),  # lost: logged again after the resume
        start(resumed_from_step=2),
        step(3, 3.0, 20.0, mfu=0.02),
        step(4, 2.0, 1200.0, mfu=0.36),
        step(5, 1.0, 1300.0, mfu=0.39),
    ]
    s = summarize(lines)
    assert s.warm_up_steps == [1, 3]
    assert s.tokens_per_s == [10.0, 1000.0, 20.0, 1200.0, 1300.0]
    assert s.median_tokens_per_s == 1200.0  # with the resume's warm-up it would be 1000
    assert s.mfu == 0.36


def test_median_tokens_per_s_with_one_window_uses_it() -> None:
    assert summarize([step(1, 5.0, 123.0)]).median_tokens_per_s == 123.0


def test_empty_log() -> None:
    s = summarize(["nothing", "here"])
    assert s == TrainingSummary()
    assert (s.first_loss, s.final_loss, s.median_tokens_per_s) == (None, None, None)
    assert s.as_dict()["last_step"] == 0
    assert not s.finished


# --- training gates ---------------------------------------------------------------------------------

GATES = {"final_loss_max": 2.3, "min_tokens_per_s": 2000, "loss_must_decrease": True}


def summary(losses: list[float], tps: list[float] | None = None, steps: list[int] | None = None) -> TrainingSummary:
    steps = steps or [10 * (i + 1) for i in range(len(losses))]
    tps = tps or [5000.0] * len(losses)
    return TrainingSummary(steps=steps, losses=losses, tokens_per_s=tps, warm_up_steps=steps[:1])


def test_good_run_passes() -> None:
    assert training_failures(summary([4.0, 3.0, 2.0]), GATES, max_steps=30) == []


def test_no_step_logged() -> None:
    assert training_failures(TrainingSummary(), GATES, max_steps=30) == ["no training step was logged"]


def test_run_that_stopped_early() -> None:
    assert training_failures(summary([4.0, 2.0]), GATES, max_steps=300) == ["steps: reached 20, expected 300"]


def test_final_loss_too_high() -> None:
    assert training_failures(summary([4.0, 2.5]), GATES, max_steps=20) == ["final_loss: 2.5000 > allowed 2.3"]


def test_loss_did_not_decrease() -> None:
    failures = training_failures(summary([2.0, 2.1]), GATES, max_steps=20)
    assert failures == ["loss did not decrease: first 2.0000, final 2.1000"]
    assert training_failures(summary([2.0, 2.1]), {**GATES, "loss_must_decrease": False}, max_steps=20) == []


def test_throughput_too_low() -> None:
    failures = training_failures(summary([4.0, 2.0, 1.0], tps=[9999.0, 1500.0, 1700.0]), GATES, max_steps=30)
    assert failures == ["tokens_per_s: median 1600 < required 2000"]


def test_every_failure_is_listed() -> None:
    failures = training_failures(summary([2.0, 9.0], tps=[1.0, 1.0]), GATES, max_steps=100)
    assert [f.split(":")[0] for f in failures] == ["steps", "final_loss", "loss did not decrease", "tokens_per_s"]


@pytest.mark.parametrize("loss", ["NaN", "Infinity"])
def test_a_diverged_run_fails_whatever_the_gates_and_its_summary_stays_json(loss: str) -> None:
    """A framework that trains on after its loss went NaN: the gates judge the divergence, and the summary (an
    XCom, which Airflow sends as strict JSON, and a history entry) holds no NaN."""
    log = [
        '{"event": "step", "step": 10, "loss": 4.0, "tokens_per_s": 5000.0}',
        '{"event": "step", "step": 20, "loss": 2.0, "tokens_per_s": 5000.0}',
        f'{{"event": "step", "step": 30, "loss": {loss}, "tokens_per_s": 5000.0}}',
    ]
    parsed = summarize(log)
    json.dumps(parsed.as_dict(), allow_nan=False)
    assert (parsed.diverged_at, parsed.steps, parsed.final_loss) == (30, [10, 20], 2.0)
    unset = {"final_loss_max": None, "min_tokens_per_s": None, "loss_must_decrease": False}
    for gates in (GATES, unset):
        failures = training_failures(parsed, gates, max_steps=30)
        assert failures[0] == "loss: not finite from step 30 (training diverged), whatever the gates"


def test_a_relaunch_that_gets_past_the_step_a_fault_made_nan_is_no_divergence() -> None:
    """The batch script relaunched the trainer from its step 10 checkpoint after a NaN at step 20 (a flaky GPU,
    say); the relaunch trained past it with finite numbers."""
    log = [
        '{"event": "start", "world_size": 2}',
        '{"event": "step", "step": 10, "loss": 4.0, "tokens_per_s": 5000.0}',
        '{"event": "diverged", "step": 20, "grad_norm": "nan"}',
        '{"event": "start", "world_size": 2}',
        '{"event": "step", "step": 20, "loss": 3.0, "tokens_per_s": 5000.0}',
        '{"event": "step", "step": 30, "loss": 2.0, "tokens_per_s": 5000.0}',
        '{"event": "end", "step": 30}',
    ]
    parsed = summarize(log)
    assert (parsed.diverged_at, parsed.steps, parsed.restarts) == (None, [10, 20, 30], 1)
    assert training_failures(parsed, GATES, max_steps=30) == []


def test_the_trainers_divergence_is_the_first_step_it_was_seen_at() -> None:
    log = [
        '{"event": "step", "step": 5, "loss": 4.0, "tokens_per_s": 5000.0}',
        '{"event": "diverged", "step": 7, "grad_norm": "nan"}',
        '{"event": "diverged", "step": 6, "grad_norm": "inf"}',
    ]
    failures = training_failures(summarize(log), GATES, max_steps=5)
    assert failures == ["loss: not finite from step 6 (training diverged), whatever the gates", *failures[1:]]
    assert training_failures(summarize(log[1:]), GATES, max_steps=5) == [
        "loss: not finite from step 6 (training diverged), whatever the gates",
        "no training step was logged",
    ]


def test_unset_gates_are_not_judged() -> None:
    gates = {"final_loss_max": None, "min_tokens_per_s": None, "loss_must_decrease": False}
    assert training_failures(summary([1.0, 99.0], tps=[1.0, 1.0]), gates, max_steps=20) == []
