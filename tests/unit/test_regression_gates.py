"""Regression gates against the median of recent comparable runs."""

from __future__ import annotations

from dtp.metrics.gates import regression_failures
from dtp.recipes import Gates

GATES = Gates().model_dump()


def _run(loss: float, tps: float, nodes: int = 2, steps: int = 300, **more: object) -> dict:
    return {"final_loss": loss, "median_tokens_per_s": tps, "num_nodes": nodes, "max_steps": steps, **more}


def test_no_verdict_until_enough_history() -> None:
    assert regression_failures(_run(9.0, 1.0), [_run(2.0, 20000)] * 2, GATES) == []


def test_within_tolerance_passes() -> None:
    history = [_run(2.00, 20000), _run(2.10, 21000), _run(2.05, 19000)]
    assert regression_failures(_run(2.20, 15000), history, GATES) == []


def test_loss_and_throughput_regressions_name_metric_and_size() -> None:
    history = [_run(2.00, 20000), _run(2.10, 21000), _run(2.05, 19000)]
    failures = regression_failures(_run(2.40, 10000), history, GATES)
    assert len(failures) == 2
    assert failures[0].startswith("final_loss regressed: 2.4000 vs median 2.0500 of the last 3 runs (+17.1%")
    assert failures[1].startswith("tokens_per_s regressed: 10000 vs median 20000 of the last 3 runs (-50.0%")


def test_only_comparable_runs_count() -> None:
    other_shape = [_run(1.0, 90000, nodes=4), _run(1.0, 90000, steps=1000), _run(1.0, 90000, nodes=1)]
    assert regression_failures(_run(2.4, 10000), other_shape, GATES) == []
    other_runs = [_run(1.0, 90000, dataset_uri="s3://b/other/"), _run(1.0, 90000, profile_steps=5)] * 2
    assert regression_failures(_run(2.4, 10000), other_runs, GATES) == []
    # An entry recorded before dataset_uri and profile_steps were kept stands for the defaults: it compares.
    assert regression_failures(_run(2.4, 10000, dataset_uri="", profile_steps=0), [_run(1.0, 90000)] * 3, GATES)


def test_a_lasting_regression_does_not_become_its_own_baseline() -> None:
    good = [_run(2.0, 20000, passed=True)] * 3
    regressed = [_run(2.4, 10000, passed=False)] * GATES["history_runs"]
    failures = regression_failures(_run(2.4, 10000), good + regressed, GATES)
    assert [f.split(":")[0] for f in failures] == ["final_loss regressed", "tokens_per_s regressed"]


def test_only_the_newest_history_runs_count() -> None:
    old_good = [_run(1.0, 50000)] * 20
    recent = [_run(2.4, 10000)] * GATES["history_runs"]
    assert regression_failures(_run(2.4, 10000), old_good + recent, GATES) == []
