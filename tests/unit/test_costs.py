"""dtp.costs: what a run is estimated to take and cost, and the time limit its budget and expiry give the job."""

from __future__ import annotations

import pytest

from dtp.costs import (
    FSX_SMALLEST_GIB,
    JOB_START_MINUTES,
    MODEL_PARAMETERS,
    SETUP_HOURS,
    SHARED_FS_WRITE_BYTES_PER_S,
    checkpoint_bytes,
    checkpoint_footprint_bytes,
    checkpoint_write_seconds,
    estimate_cost_usd,
    estimate_training_hours,
    fsx_storage_gib_for,
    training_time_limit_minutes,
)
from dtp.form_params import ParamsError, parse_params
from dtp.params import TrainParams, validate_params
from dtp.pipeline.jobs import HANG_MARGIN_SECONDS, hang_timeout_seconds, priced_for, training_config
from dtp.pipeline.spec import run_spec
from dtp.platforms.parallelcluster import ParallelClusterSettings
from dtp.recipes import catalogue, get_recipe, instance_types
from model import MODELS, count_parameters


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
    params = TrainParams(num_nodes=4, max_steps=3600, checkpoint_interval=3600)
    recipe = get_recipe("tiny").model_copy(update={"expected_step_seconds": 1.0})
    # (1 h + 10 min + 2 h of cluster creation, staging, preflight and teardown) x 10 USD/h x 4; tiny's one
    # checkpoint (5.5 MB) is written in a fiftieth of a second.
    assert estimate_cost_usd(params, recipe, price_per_hour=10.0) == 126.67
    assert estimate_cost_usd(params, recipe, price_per_hour=0.0) == 0.0


def test_the_estimate_counts_each_checkpoint_written_to_the_shared_file_system() -> None:
    recipe = get_recipe("llama3_1_70b")
    params = TrainParams(num_nodes=16, max_steps=1000, checkpoint_interval=250)
    # 4 checkpoints of 847 GB at the default FSx's 293 MB/s: 48 min each, besides 1000 x 8 s and 10 min to start.
    write_hours = 4 * 846_644_477_952 / (1200 / 1024 * 250e6) / 3600
    assert write_hours == pytest.approx(3.21, abs=0.01)
    assert estimate_training_hours(params, recipe) == pytest.approx(1000 * 8 / 3600 + write_hours + 10 / 60)
    once = TrainParams(num_nodes=16, max_steps=1000, checkpoint_interval=1000)
    assert estimate_training_hours(params, recipe) - estimate_training_hours(once, recipe) == pytest.approx(
        write_hours * 3 / 4
    )


def test_the_estimate_counts_neuronx_distributeds_graph_compilation() -> None:
    trn1 = get_recipe("llama3_1_8b_trn1")
    fsdp = trn1.model_copy(update={"framework": "fsdp"})
    params = TrainParams(num_nodes=4, max_steps=1000, checkpoint_interval=500)
    # neuron_parallel_compile runs before the first step: a 30 minute allowance.
    assert estimate_training_hours(params, trn1) - estimate_training_hours(params, fsdp) == pytest.approx(0.5)


def test_the_write_throughput_is_the_smallest_parallelcluster_file_systems() -> None:
    fields = ParallelClusterSettings.model_fields
    capacity_tib = FSX_SMALLEST_GIB / 1024
    assert capacity_tib * fields["fsx_throughput_per_tib"].default * 1e6 == SHARED_FS_WRITE_BYTES_PER_S


@pytest.mark.parametrize(
    ("gib", "size"), [(1, 1200), (1200, 1200), (1200.5, 2400), (2400, 2400), (2401, 4800), (10_000, 12_000)]
)
def test_a_file_system_for_some_bytes_is_the_smallest_persistent_2_size_that_holds_them(gib: float, size: int) -> None:
    assert fsx_storage_gib_for(gib * 2**30) == size


@pytest.mark.parametrize("name", list(MODELS))
def test_model_parameters_are_the_trainers_count(name: str) -> None:
    assert MODEL_PARAMETERS[name] == count_parameters(MODELS[name])


def test_every_recipe_model_has_a_parameter_count() -> None:
    assert {recipe.model for recipe in catalogue().values()} <= set(MODEL_PARAMETERS)


def test_a_checkpoint_holds_fp32_parameters_and_adamws_two_moments() -> None:
    assert checkpoint_bytes(get_recipe("llama3_1_70b")) == 12 * 70_553_706_496  # ~847 GB
    assert checkpoint_bytes(get_recipe("mixtral_8x7b")) == 12 * 46_702_792_704  # ~560 GB
    assert checkpoint_bytes(get_recipe("llama3_1_70b_megatron")) == 14 * 70_553_706_496  # torch_dist: + bf16


def test_the_footprint_is_the_checkpoints_the_framework_keeps_and_the_one_it_writes() -> None:
    params = TrainParams(max_steps=1000, checkpoint_interval=100)  # 10 saves
    one = checkpoint_bytes(get_recipe("llama3_1_70b"))
    assert checkpoint_footprint_bytes(params, get_recipe("llama3_1_70b")) == 3 * one  # DTP's trainer keeps 2
    assert checkpoint_footprint_bytes(params, get_recipe("llama3_1_70b_megatron")) == 10 * 14 / 12 * one  # all
    assert checkpoint_footprint_bytes(TrainParams(max_steps=1000, checkpoint_interval=1000), get_recipe("tiny")) == (
        12 * 459_392
    )


def test_a_budget_that_pays_for_the_training_job_alone_is_refused() -> None:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    recipe, price = get_recipe(conf["recipe"]), instance_types()[conf["instance_type"]].price_usd_per_hour
    training = estimate_training_hours(TrainParams(**conf), recipe) * 4 * price
    with pytest.raises(ParamsError, match=r"budget_usd: got .*; the estimated cost is "):
        validate_params({**conf, "budget_usd": round(training + 1, 2)})
    assert validate_params({**conf, "budget_usd": round(training + SETUP_HOURS * 4 * price + 1, 2)})


def test_a_budget_equal_to_the_estimate_lets_the_job_start_and_run_every_step() -> None:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 4}
    recipe, instance = get_recipe(conf["recipe"]), instance_types()[conf["instance_type"]]
    cost = estimate_cost_usd(TrainParams(**conf), recipe, instance.price_usd_per_hour)
    params = validate_params({**conf, "budget_usd": cost})
    spec = run_spec(params, "train_e2e", "manual__1")
    steps_minutes = params.max_steps * recipe.expected_step_seconds / 60
    # 6 checkpoints (300 steps, one every 50) of 96 GB at 293 MB/s: 5.5 min each
    writes_minutes = 6 * checkpoint_bytes(recipe) / SHARED_FS_WRITE_BYTES_PER_S / 60
    # Slurm stops the job at its limit: the steps alone would leave no time to start or write the checkpoints.
    assert spec["training_time_limit_minutes"] >= steps_minutes + writes_minutes + JOB_START_MINUTES - 1
    hours = estimate_training_hours(params, recipe)
    assert hours * 60 == pytest.approx(steps_minutes + writes_minutes + JOB_START_MINUTES)


@pytest.mark.parametrize(("recipe", "max_steps"), [("llama3_1_70b", 10_000), ("llama3_1_8b", 100_000), ("tiny", 300)])
def test_dtps_trainer_prints_a_step_line_well_within_the_hang_timeout_however_long_the_run(
    recipe: str, max_steps: int
) -> None:
    # A hundredth of a 10,000-step 70B run is 100 steps of 8 s: 800 s of silence, past the default 600 s timeout.
    conf = {"recipe": recipe, "max_steps": max_steps, "checkpoint_interval": max_steps, "budget_usd": 1e6}
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "r")
    parsed = get_recipe(recipe)
    instance = instance_types()[spec["params"]["instance_type"]].model_dump()
    config = training_config(spec, parsed, "/fsx/runs/r", {"train_bin": "/fsx/runs/r/train.bin"}, instance)
    assert config["log_interval"] * parsed.expected_step_seconds <= hang_timeout_seconds(spec, parsed) / 4
    assert config["log_interval"] <= max(1, max_steps // 100)


def test_a_framework_that_writes_a_long_checkpoint_in_silence_is_not_taken_for_hung_meanwhile() -> None:
    # Megatron-LM prints nothing while it writes a 70B checkpoint (~55 minutes at the default FSx's baseline).
    conf = {"recipe": "llama3_1_70b_megatron", "dataset_uri": "s3://dtp-data/d/", "hang_timeout_minutes": 10}
    megatron = run_spec(parse_params(TrainParams, conf), "train_e2e", "r")
    recipe = get_recipe("llama3_1_70b_megatron")
    write = checkpoint_write_seconds(recipe)
    assert write > 600 and hang_timeout_seconds(megatron, recipe) == write + HANG_MARGIN_SECONDS
    # DTP's trainer prints while it saves: the form's timeout holds, as it does where it is the longer one.
    trainer = run_spec(
        parse_params(TrainParams, {"recipe": "llama3_1_70b", "hang_timeout_minutes": 10}), "train_e2e", "r"
    )
    assert hang_timeout_seconds(trainer, get_recipe("llama3_1_70b")) == 600
    patient = run_spec(parse_params(TrainParams, {**conf, "hang_timeout_minutes": 1440}), "train_e2e", "r")
    assert hang_timeout_seconds(patient, recipe) == 1440 * 60
