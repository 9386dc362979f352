"""Regression gates against the median of recent comparable runs."""

from __future__ import annotations

import pytest

from dtp.form_params import parse_params
from dtp.metrics.gates import (
    COMPARED_PARAMS,
    extra_env_digest,
    recipe_digest,
    regression_failures,
    runtime_of,
    throughput_scale,
    training_failures,
)
from dtp.metrics.parse import TrainingSummary
from dtp.params import TrainParams
from dtp.pipeline import results
from dtp.pipeline.spec import run_spec
from dtp.recipes import Gates, get_recipe

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


TINY = get_recipe("tiny").model_dump()


def test_the_recipe_digest_is_of_what_it_trains() -> None:
    digest = recipe_digest(TINY)
    assert len(digest) == 12 and recipe_digest(dict(TINY)) == digest
    changes = {
        "micro_batch": TINY["micro_batch"] + 1,
        "lr": TINY["lr"] * 2,
        "seq_len": 4 * TINY["seq_len"],
        "precision": "bf16",
        "parallelism": {"tensor": 2, "pipeline": 1, "context": 1},
    }
    for field, value in changes.items():
        assert recipe_digest({**TINY, field: value}) != digest, field
    # How runs are judged, their defaults, schedule and prose change nothing they train.
    same = {**TINY, "gates": {}, "defaults": {}, "schedule": "@hourly", "description": "x", "expected_step_seconds": 9}
    assert recipe_digest(same) == digest


def test_the_runtime_is_the_image_and_the_ami() -> None:
    assert runtime_of({"source": "image r/dtp@sha256:ab", "image": "r/dtp@sha256:ab", "ami": "ami-1"}) == (
        "r/dtp@sha256:ab on ami-1"
    )
    assert runtime_of({"source": "project virtualenv", "python": "/x/python"}) == "project virtualenv"
    assert runtime_of(None) is None


@pytest.mark.parametrize(
    ("field", "before", "after"),
    [
        ("recipe_digest", recipe_digest(TINY), recipe_digest({**TINY, "micro_batch": TINY["micro_batch"] * 2})),
        ("runtime", "r/dtp@sha256:old on ami-1", "r/dtp@sha256:new on ami-1"),
        ("runtime", "r/dtp@sha256:ab on ami-1", "r/dtp@sha256:ab on ami-2"),
        ("actual_instance_type", "p5.48xlarge", "p4de.24xlarge"),  # a capacity fallback's nodes
        ("extra_env_digest", extra_env_digest({}), extra_env_digest({"NCCL_PROTO": "Simple"})),
        ("extra_env_digest", extra_env_digest({"FI_EFA_USE_DEVICE_RDMA": "1"}), extra_env_digest({})),
    ],
)
def test_a_new_recipe_image_or_instance_type_starts_a_new_baseline(field: str, before: str, after: str) -> None:
    # The runs before the change passed; every run since trains slower. Were they compared, every later run would
    # fail, and a failed run never joins the baseline: it would stay the old runs' for good.
    before_runs = [_run(2.0, 20000, passed=True, **{field: before})] * 10
    assert regression_failures(_run(2.0, 10000, **{field: after}), before_runs, GATES) == []
    since = [_run(2.0, 10000, passed=True, **{field: after})] * 3
    assert regression_failures(_run(2.0, 10000, **{field: after}), before_runs + since, GATES) == []
    assert regression_failures(_run(2.0, 5000, **{field: after}), before_runs + since, GATES)


def test_an_entry_recorded_before_recipe_and_runtime_were_kept_compares_only_with_a_run_without_them() -> None:
    old = [_run(1.0, 90000)] * 3  # recorded before: whatever recipe and image they ran is unknown
    kept = {
        "recipe_digest": recipe_digest(TINY),
        "runtime": "project virtualenv",
        "actual_instance_type": "local.cpu",
        "extra_env_digest": extra_env_digest({}),
    }
    assert regression_failures(_run(2.4, 10000, **kept), old, GATES) == []
    assert regression_failures(_run(2.4, 10000), old, GATES)
    assert {k: COMPARED_PARAMS[k] for k in kept} == dict.fromkeys(kept)


def test_a_regression_names_what_the_runs_it_was_compared_with_share() -> None:
    kept = {
        "recipe_digest": "0123456789ab",
        "runtime": "r/dtp@sha256:ab on ami-1",
        "actual_instance_type": "p5e.48xlarge",
    }
    history = [_run(2.0, 20000, **kept)] * 3
    failures = regression_failures(_run(2.4, 10000, **kept), history, GATES)
    assert len(failures) == 2  # loss and throughput
    for failure in failures:
        assert "recipe_digest='0123456789ab', runtime='r/dtp@sha256:ab on ami-1'" in failure
        assert "actual_instance_type='p5e.48xlarge'" in failure and "num_nodes=2, max_steps=300" in failure


def test_the_extra_env_digest_tells_environments_apart_without_their_values() -> None:
    token = {"HF_TOKEN": "hf_0123456789abcdef"}
    assert extra_env_digest(token) != extra_env_digest({"HF_TOKEN": "hf_fedcba9876543210"}) != extra_env_digest({})
    assert extra_env_digest({"A": "1", "B": "2"}) == extra_env_digest({"B": "2", "A": "1"})
    assert "hf_" not in extra_env_digest(token) and len(extra_env_digest(token)) == 12


# --- the throughput gate on the nodes the run got ----------------------------------------------------------------

LLAMA_8B = get_recipe("llama3_1_8b").model_dump()  # min_tokens_per_s 150000 on 4 x p5.48xlarge


def test_the_throughput_gate_scales_with_the_nodes_peak_flops() -> None:
    assert throughput_scale(LLAMA_8B, "p5.48xlarge", 4) == 1
    assert throughput_scale(LLAMA_8B, "p5e.48xlarge", 4) == 1  # an H200's dense bf16 peak is an H100's
    assert throughput_scale(LLAMA_8B, "p4de.24xlarge", 4) == pytest.approx(312 / 989)
    assert throughput_scale(LLAMA_8B, "p5.48xlarge", 2) == 0.5
    assert throughput_scale(TINY, "local.cpu", 1) == 1  # no peak known for CPU nodes: the gate as set


def _steady_at(tokens_per_s: float) -> TrainingSummary:
    return TrainingSummary(steps=[1, 2, 3], losses=[5.0, 4.0, 2.0], tokens_per_s=[tokens_per_s] * 3)


def test_a_scaled_throughput_gate_names_the_recipes_figure_and_the_scale() -> None:
    gates = {"min_tokens_per_s": 150000}
    assert training_failures(_steady_at(100000), gates, 3) == ["tokens_per_s: median 100000 < required 150000"]
    assert training_failures(_steady_at(100000), gates, 3, scale=312 / 989) == []
    assert training_failures(_steady_at(40000), gates, 3, scale=312 / 989) == [
        "tokens_per_s: median 40000 < required 47321 (150000 x 0.315, these nodes' peak FLOP/s over those of the "
        "recipe's default instance type and nodes)"
    ]


def test_a_healthy_run_on_a_capacity_fallbacks_slower_nodes_passes_the_throughput_gate() -> None:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    spec = run_spec(parse_params(TrainParams, {**conf, "max_steps": 3, "checkpoint_interval": 3}), "train_e2e", "r")
    # 100000 tokens/s: a third of what 4 x p5 reach, as 4 x p4de's A100s have a third of their peak.
    metrics = {**_steady_at(100000).as_dict(), "history": []}
    assert results.gate_failures(spec, {**metrics, "actual_instance_type": "p4de.24xlarge"}) == []
    assert results.gate_failures(spec, {**metrics, "actual_instance_type": "p5.48xlarge"}) == [
        "tokens_per_s: median 100000 < required 150000.0"
    ]
