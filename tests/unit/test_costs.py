"""dtp.costs: what a run is estimated to take and cost, and the time limit its budget and expiry give the job."""

from __future__ import annotations

import pytest

from dtp.costs import (
    JOB_START_MINUTES,
    SETUP_HOURS,
    estimate_cost_usd,
    estimate_training_hours,
    training_time_limit_minutes,
)
from dtp.params import ParamsError, TrainParams, parse_params, validate_params
from dtp.pipeline.jobs import priced_for
from dtp.pipeline.spec import run_spec
from dtp.recipes import get_recipe, instance_types


def test_training_time_limit_ends_before_the_expiry() -> None:
    # 24 h expiry - 2 h for the cluster and results - 1 h pending: the reaper never deletes a run that trains.
    assert training_time_limit_minutes(1e6, 4, 10.0, expiry_hours=24, pending_timeout_minutes=60) == 21 * 60
    assert training_time_limit_minutes(180.0, 4, 10.0, expiry_hours=24, pending_timeout_minutes=60) == 150
    assert training_time_limit_minutes(100.0, 4, 0.0, expiry_hours=24, pending_timeout_minutes=0) == 22 * 60  # free
    spec = run_spec(parse_params(TrainParams, {"expiry_hours": 5, "pending_timeout_minutes": 30}), "train_e2e", "r")
    assert spec["training_time_limit_minutes"] == 150


def test_training_time_limit_is_what_the_budget_pays_for_once_the_setup_is_paid() -> None:
    # 180 USD - 2 h of setup on 4 x 10 USD/h = 100 USD for training: 2.5 h.
    assert training_time_limit_minutes(180.0, 4, 10.0, 720, 0) == 150
    assert training_time_limit_minutes(80.0, 4, 10.0, 720, 0) == 1  # the setup takes it all: Slurm's least
    assert training_time_limit_minutes(0.01, 1, 98.32, 720, 0) == 1
    # A cheap instance's budget pays for years; the longest expiry (720 h) bounds it, within Batch's 32-bit seconds.
    assert training_time_limit_minutes(1e6, 1, 0.0001, 720, 0) == (720 - 2) * 60


def test_after_a_capacity_fallback_the_time_limit_is_what_the_budget_pays_for_there() -> None:
    conf = {"platform": "local", "recipe": "tiny", "instance_type": "local.cpu", "num_nodes": 2, "budget_usd": 1000.0}
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__1")
    spec = {**spec, "instance": instance_types()["p5.48xlarge"].model_dump()}  # as asked: 98.32 USD/h
    # (1000 USD - 2 h x 2 x 98.32 USD/h) / (2 x 98.32 USD/h)
    assert priced_for(spec, {})["training_time_limit_minutes"] == 185
    fallback = {"instance": instance_types()["p5e.48xlarge"].model_dump()}  # 108.15 USD/h
    assert priced_for(spec, fallback)["training_time_limit_minutes"] == 157


def test_estimate_cost_usd_counts_the_steps_the_job_start_and_the_setup() -> None:
    params = TrainParams(num_nodes=4, max_steps=3600, checkpoint_interval=50)
    # (1 h + 10 min + 2 h of cluster creation, staging, preflight and teardown) x 10 USD/h x 4
    assert estimate_cost_usd(params, step_seconds=1.0, price_per_hour=10.0) == 126.67
    assert estimate_cost_usd(params, step_seconds=0.5, price_per_hour=0.0) == 0.0


def test_a_budget_that_pays_for_the_training_job_alone_is_refused() -> None:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    recipe, price = get_recipe(conf["recipe"]), instance_types()[conf["instance_type"]].price_usd_per_hour
    training = estimate_training_hours(TrainParams(**conf), recipe.expected_step_seconds) * 4 * price
    with pytest.raises(ParamsError, match=r"budget_usd: got .*; the estimated cost is "):
        validate_params({**conf, "budget_usd": round(training + 1, 2)})
    assert validate_params({**conf, "budget_usd": round(training + SETUP_HOURS * 4 * price + 1, 2)})


def test_a_budget_equal_to_the_estimate_lets_the_job_start_and_run_every_step() -> None:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    recipe, instance = get_recipe(conf["recipe"]), instance_types()[conf["instance_type"]]
    cost = estimate_cost_usd(TrainParams(**conf), recipe.expected_step_seconds, instance.price_usd_per_hour)
    params = validate_params({**conf, "budget_usd": cost})
    spec = run_spec(params, "train_e2e", "manual__1")
    steps_minutes = params.max_steps * recipe.expected_step_seconds / 60
    # Slurm stops the job at its limit: the steps alone would leave no time to start.
    assert spec["training_time_limit_minutes"] >= steps_minutes + JOB_START_MINUTES - 1
    hours = estimate_training_hours(params, recipe.expected_step_seconds)
    assert hours * 60 == pytest.approx(steps_minutes + JOB_START_MINUTES)
