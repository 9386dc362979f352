"""dtp.params: a run's needs against what it has: room for its checkpoints on the shared file system, its budget, and
enough of the sample corpus for a step."""

from __future__ import annotations

from typing import Any

import pytest
from parallelcluster_support import use_settings
from params_support import NAMES, refuse

from dtp.costs import MODEL_PARAMETERS
from dtp.form_params import ParamsError
from dtp.params import validate_params
from dtp.pipeline.spec import build_spec, checkpoint_space_problem, sample_corpus_problem
from dtp.platforms import get_platform
from dtp.recipes import get_recipe

BIG_70B = {
    "platform": "parallelcluster",
    "recipe": "llama3_1_70b",
    "instance_type": "p5.48xlarge",
    "num_nodes": 16,
    "max_steps": 1000,
    "checkpoint_interval": 250,
}


# --- checkpoints on the shared file system ------------------------------------------------------

AFFORDABLE_70B = {**BIG_70B, "budget_usd": 1e6}


def test_checkpoints_the_clusters_file_system_cannot_hold_are_refused_with_what_would_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_settings(monkeypatch, key_name="dtp-head", fsx_storage_capacity_gib=1200)
    with pytest.raises(ParamsError) as info:
        build_spec({}, AFFORDABLE_70B, NAMES)
    # DTP's trainer keeps 2 checkpoints of 847 GB and writes the third before it deletes the oldest.
    assert str(info.value) == (
        "invalid parameters:\ncheckpoint_interval: got 250; recipe 'llama3_1_70b' (fsdp) saves 4 checkpoints of 847 "
        "GB (70.6B parameters and their optimizer state), up to 3 at once on the shared file system: 2365 GiB, more "
        "than the 1200 GiB FSx for Lustre dtp_parallelcluster makes for the run: give a checkpoint_interval of 1000 "
        "or more, or give dtp_parallelcluster an fsx_storage_capacity_gib of 2400 or more (or none, to size it to "
        "each run), or an existing FSx for Lustre that has the room (fsx_file_system_id)"
    )


@pytest.mark.parametrize(
    ("conf", "settings"),
    [
        ({"checkpoint_interval": 1000}, {}),  # one checkpoint, at the end
        ({}, {"fsx_storage_capacity_gib": 2400}),
        ({}, {}),  # a file system sized to the run
        ({}, {"fsx_file_system_id": "fs-0123456789abcdef0"}),  # its free space is not known: not judged
    ],
)
def test_checkpoints_that_fit_or_a_file_system_of_unknown_size_pass(
    monkeypatch: pytest.MonkeyPatch, conf: dict[str, Any], settings: dict[str, Any]
) -> None:
    platform = use_settings(monkeypatch, key_name="dtp-head", **settings)
    params = validate_params({**AFFORDABLE_70B, **conf})
    assert checkpoint_space_problem(params, get_recipe("llama3_1_70b"), platform) is None


@pytest.mark.parametrize("platform", ["hyperpod", "eks"])
def test_checkpoints_are_not_judged_where_the_file_systems_size_is_not_known(platform: str) -> None:
    params = validate_params({**AFFORDABLE_70B, "platform": platform})
    assert checkpoint_space_problem(params, get_recipe("llama3_1_70b"), get_platform(platform)) is None


def test_fewer_checkpoints_of_mixtral_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = use_settings(monkeypatch, key_name="dtp-head", fsx_storage_capacity_gib=1200)
    conf = {**AFFORDABLE_70B, "recipe": "mixtral_8x7b", "num_nodes": 8}
    problem = checkpoint_space_problem(validate_params(conf), get_recipe("mixtral_8x7b"), platform)
    # 3 x 560 GB do not fit in 1200 GiB, 2 do.
    assert problem is not None
    assert problem.startswith("checkpoint_interval: got 250; recipe 'mixtral_8x7b' (fsdp) saves 4 checkpoints of 560")
    assert "give a checkpoint_interval of 500 or more" in problem
    assert (
        checkpoint_space_problem(
            validate_params({**conf, "checkpoint_interval": 500}), get_recipe("mixtral_8x7b"), platform
        )
        is None
    )


def test_a_model_whose_one_checkpoint_does_not_fit_names_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = use_settings(monkeypatch, key_name="dtp-head", fsx_storage_capacity_gib=1200)
    monkeypatch.setitem(MODEL_PARAMETERS, "llama3_1_70b", 120_000_000_000)  # 1440 GB a checkpoint
    problem = checkpoint_space_problem(validate_params(AFFORDABLE_70B), get_recipe("llama3_1_70b"), platform)
    assert problem is not None
    assert problem.startswith("recipe: got 'llama3_1_70b'; recipe 'llama3_1_70b' (fsdp) saves 4 checkpoints of 1440")
    assert problem.endswith(
        "give dtp_parallelcluster an fsx_storage_capacity_gib of 4800 or more (or none, to size it to each run), or "
        "an existing FSx for Lustre that has the room (fsx_file_system_id)"
    )


def test_budget_too_low_for_70b_names_the_cost_along_with_the_platform() -> None:
    message = refuse({**BIG_70B, "budget_usd": 100})
    # (1000 steps x 8 s + 4 checkpoints of 847 GB at the default FSx's 293 MB/s + 10 min to start + 2 h of cluster
    # creation, preflight and teardown) x 16 nodes x 98.32 USD/h
    assert (
        "\nbudget_usd: got 100.0; the estimated cost is 11955.50 USD (16 x p5.48xlarge for 1000 steps and up to 2 h of"
        " setup and teardown)"
    ) in message


def test_sufficient_budget_is_accepted() -> None:
    assert validate_params({**BIG_70B, "budget_usd": 11956}).budget_usd == 11956


# --- the sample corpus ----------------------------------------------------------------------------


def test_a_run_whose_step_takes_more_windows_than_the_sample_corpus_has_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 x 8 GPUs take 128 windows of 8192 + 1 bytes a step; the shipped corpus (613 kB) has 74.
    use_settings(monkeypatch, key_name="dtp-head")
    with pytest.raises(ParamsError) as info:
        build_spec({}, {**AFFORDABLE_70B, "checkpoint_interval": 1000}, NAMES)
    assert str(info.value) == (
        "invalid parameters:\ndataset_uri: empty, so recipe 'llama3_1_70b' would train on DTP's sample corpus, 74 "
        "windows of 8192 + 1 bytes, while a step on 16 x p5.48xlarge takes 128 and no two ranks of a step may share "
        "one: give a dataset_uri"
    )


@pytest.mark.parametrize(
    "conf",
    [
        {**AFFORDABLE_70B, "num_nodes": 9},  # 72 windows a step
        {**AFFORDABLE_70B, "dataset_uri": "s3://corpus/text/"},
        {**AFFORDABLE_70B, "recipe": "llama3_1_70b_megatron", "dataset_uri": "s3://corpus/megatron/"},
        {**AFFORDABLE_70B, "recipe": "mixtral_8x7b", "num_nodes": 8},  # 64 of the 149 windows of 4096 + 1 bytes
    ],
)
def test_a_run_the_sample_corpus_has_the_windows_for_or_of_another_dataset_passes(conf: dict[str, Any]) -> None:
    params = validate_params(conf)
    assert sample_corpus_problem(params, get_recipe(params.recipe)) is None
