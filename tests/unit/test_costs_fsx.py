"""dtp.costs with the FSx for Lustre DTP makes for a run: its cost in the estimate and the budget's time limit, and
its size's write speed in the training hours."""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
from parallelcluster_support import use_settings

from dtp.costs import (
    FSX_USD_PER_GIB_MONTH,
    SETUP_HOURS,
    SHARED_FS_WRITE_BYTES_PER_S,
    RunFsx,
    checkpoint_bytes,
    checkpoint_write_seconds,
    estimate_cost_usd,
    estimate_training_hours,
    training_time_limit_minutes,
)
from dtp.form_params import ParamsError, parse_params
from dtp.naming import RunNames
from dtp.params import TrainParams, validate_params
from dtp.pipeline.jobs import hang_timeout_seconds, priced_for, stop_signal_seconds, training_config
from dtp.pipeline.spec import build_spec, run_fsx, run_spec
from dtp.platforms.parallelcluster import ParallelClusterSettings
from dtp.recipes import get_recipe, instance_types

# The 70B recipe on its 16 p5 nodes with train_e2e's form defaults: 300 steps, a checkpoint every 50.
RUN_70B: dict[str, Any] = {
    "platform": "parallelcluster",
    "recipe": "llama3_1_70b",
    "instance_type": "p5.48xlarge",
    "num_nodes": 16,
}
P5_USD_PER_HOUR = instance_types()["p5.48xlarge"].price_usd_per_hour


def test_the_price_table_covers_every_throughput_parallelcluster_makes() -> None:
    throughputs = get_args(ParallelClusterSettings.model_fields["fsx_throughput_per_tib"].annotation)
    assert set(FSX_USD_PER_GIB_MONTH) == set(throughputs)
    # 4800 GiB at 0.210 USD per GiB-month, a month being 730 hours.
    assert RunFsx(4800, 250).usd_per_hour == pytest.approx(4800 * 0.210 / 730)
    assert RunFsx(1200, 1000).usd_per_hour > RunFsx(1200, 125).usd_per_hour


def test_a_70b_runs_estimate_counts_the_fsx_it_makes_for_all_its_hours(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = use_settings(monkeypatch, key_name="dtp-head")
    spec = run_spec(parse_params(TrainParams, RUN_70B), "train_e2e", "manual__1")
    assert platform.fsx_storage_capacity_gib(spec) == 4800  # 3 checkpoints of 847 GB and a fifth more
    params, recipe = TrainParams(**RUN_70B), get_recipe("llama3_1_70b")
    fsx = run_fsx(params, recipe)
    assert fsx == RunFsx(4800, 250)
    hours = estimate_training_hours(params, recipe, fsx) + SETUP_HOURS
    expected = hours * (16 * P5_USD_PER_HOUR + 4800 * 0.210 / 730)
    assert estimate_cost_usd(params, recipe, P5_USD_PER_HOUR, fsx) == round(expected, 2)
    nodes_alone = round(hours * 16 * P5_USD_PER_HOUR, 2)
    assert estimate_cost_usd(params, recipe, P5_USD_PER_HOUR, fsx) - nodes_alone == pytest.approx(
        4800 * 0.210 * hours / 730, abs=0.01
    )


def test_a_bigger_fsx_writes_a_checkpoint_faster() -> None:
    recipe = get_recipe("llama3_1_70b")
    # 847 GB at 4800 GiB x 250 MB/s per TiB (1.17 GB/s) against the smallest file system's 293 MB/s.
    assert checkpoint_write_seconds(recipe, RunFsx(4800, 250)) == math.ceil(checkpoint_bytes(recipe) / 1171.875e6)
    assert checkpoint_write_seconds(recipe, RunFsx(4800, 250)) == 723 < checkpoint_write_seconds(recipe) == 2890
    # A file system DTP does not size writes at the smallest one's speed; a slower one of that size, slower.
    assert RunFsx(1200, 250).write_bytes_per_s == SHARED_FS_WRITE_BYTES_PER_S
    assert checkpoint_write_seconds(recipe, RunFsx(1200, 250)) == checkpoint_write_seconds(recipe)
    assert checkpoint_write_seconds(recipe, RunFsx(1200, 125)) > checkpoint_write_seconds(recipe)
    params = TrainParams(**RUN_70B)
    writes_hours = 6 * checkpoint_bytes(recipe) / 3600
    assert estimate_training_hours(params, recipe) - estimate_training_hours(
        params, recipe, RunFsx(4800, 250)
    ) == pytest.approx(writes_hours / SHARED_FS_WRITE_BYTES_PER_S - writes_hours / 1171.875e6)


def test_the_budgets_time_limit_pays_for_the_fsx_too() -> None:
    fsx = RunFsx(2400, 1000)  # 1.97 USD/h
    hourly = 4 * 10.0 + fsx.usd_per_hour
    # (180 USD - 2 h of setup on the nodes and the file system) / what both cost an hour
    limit = training_time_limit_minutes(180.0, 4, 10.0, 720, 0, fsx)
    assert limit == int((180.0 - SETUP_HOURS * hourly) / hourly * 60) == 137
    assert training_time_limit_minutes(180.0, 4, 10.0, 720, 0) == 150
    # Free nodes on a file system the run pays for: the budget still bounds the job.
    assert training_time_limit_minutes(10.0, 1, 0.0, 720, 0, fsx) == int((10.0 / fsx.usd_per_hour - SETUP_HOURS) * 60)


def test_a_budget_that_pays_for_the_nodes_but_not_the_fsx_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, key_name="dtp-head")
    params, recipe = TrainParams(**RUN_70B), get_recipe("llama3_1_70b")
    fsx = run_fsx(params, recipe)
    nodes_alone = (estimate_training_hours(params, recipe, fsx) + SETUP_HOURS) * 16 * P5_USD_PER_HOUR
    with pytest.raises(ParamsError) as info:
        validate_params({**RUN_70B, "budget_usd": round(nodes_alone + 1, 2)}, run_fsx)
    cost = estimate_cost_usd(params, recipe, P5_USD_PER_HOUR, fsx)
    assert (
        f"budget_usd: got {round(nodes_alone + 1, 2)}; the estimated cost is {cost:.2f} USD (16 x p5.48xlarge and a "
        "4800 GiB FSx for Lustre at 250 MB/s per TiB for 300 steps and up to 2 h of setup and teardown)"
    ) in str(info.value)
    assert validate_params({**RUN_70B, "budget_usd": cost}, run_fsx).budget_usd == cost


def test_a_run_on_an_existing_file_system_pays_for_its_nodes_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings(monkeypatch, key_name="dtp-head", fsx_file_system_id="fs-0123456789abcdef0")
    params, recipe = TrainParams(**RUN_70B), get_recipe("llama3_1_70b")
    assert run_fsx(params, recipe) is None
    nodes_alone = estimate_cost_usd(params, recipe, P5_USD_PER_HOUR)
    assert nodes_alone == round((estimate_training_hours(params, recipe) + SETUP_HOURS) * 16 * P5_USD_PER_HOUR, 2)
    assert validate_params({**RUN_70B, "budget_usd": nodes_alone}, run_fsx).budget_usd == nodes_alone


def test_the_expiry_is_checked_against_the_write_speed_of_the_fsx_sized_to_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, key_name="dtp-head")
    # 1000 steps of 8 s and 20 checkpoints of 847 GB: 18.4 h of training at the smallest FSx's 293 MB/s, 6.4 h at
    # the 4800 GiB one's 1.17 GB/s.
    conf = {**RUN_70B, "max_steps": 1000, "budget_usd": 1e6, "expiry_hours": 10, "pending_timeout_minutes": 0}
    with pytest.raises(ParamsError, match=r"estimated to take 18\.4 h of training"):
        validate_params(conf)
    assert validate_params(conf, run_fsx).expiry_hours == 10
    with pytest.raises(ParamsError, match=r"estimated to take 6\.4 h of training"):
        validate_params({**conf, "expiry_hours": 8}, run_fsx)


def test_a_run_made_on_parallelcluster_is_priced_and_timed_with_the_fsx_it_gets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, key_name="dtp-head")
    recipe = get_recipe("llama3_1_70b")
    fsx = RunFsx(4800, 250)
    estimate = estimate_cost_usd(TrainParams(**RUN_70B), recipe, P5_USD_PER_HOUR, fsx)
    # A budget equal to the estimate: what the pipeline builds, prices and times.
    conf = {**RUN_70B, "budget_usd": estimate, "dataset_uri": "s3://corpora/web/"}
    spec = build_spec({}, conf, RunNames("train_e2e", "manual__1"))
    assert spec["fsx"] == {"storage_gib": 4800, "throughput_per_tib": 250}
    assert spec["estimated_cost_usd"] == estimate
    priced = priced_for(spec, {"instance_type": "p5.48xlarge"})
    assert priced["training_time_limit_minutes"] == spec["training_time_limit_minutes"]
    # Slurm's stop signal comes once the last save has begun: every step and the saves before it fit before it,
    # written at the speed the limit was worked out with (at the smallest FSx's, it came 200 steps early).
    write = checkpoint_write_seconds(recipe, fsx)
    signal_at = priced["training_time_limit_minutes"] * 60 - stop_signal_seconds(priced, recipe)
    assert signal_at >= 300 * recipe.expected_step_seconds + 5 * write
    # The save's collectives and a framework's silence are given that write too, not the smallest FSx's.
    config = training_config(priced, recipe, "/fsx/runs/r", {"train_bin": "/fsx/d.bin"}, spec["instance"])
    assert config["checkpoint_timeout_s"] == max(1800, 2 * write)
    megatron = get_recipe("llama3_1_70b_megatron")
    slow = {**priced, "fsx": {"storage_gib": 1200, "throughput_per_tib": 125}}
    assert hang_timeout_seconds(slow, megatron) > checkpoint_write_seconds(megatron) > 600


def test_a_spec_from_before_the_estimates_counted_fsx_is_timed_at_the_smallest_ones_speed() -> None:
    spec = run_spec(parse_params(TrainParams, RUN_70B), "train_e2e", "manual__1")
    del spec["fsx"]
    recipe = get_recipe("llama3_1_70b")
    smallest = {**spec, "fsx": {"storage_gib": 1200, "throughput_per_tib": 250}}
    assert stop_signal_seconds(spec, recipe) == stop_signal_seconds(smallest, recipe)
    assert stop_signal_seconds(spec, recipe) < stop_signal_seconds(
        {**smallest, "fsx": {**smallest["fsx"], "throughput_per_tib": 125}}, recipe
    )
