"""dtp.params: validate_params refuses every bad conf with a message naming the field and value (the trigger
form's schema: test_trigger_form_schema.py)."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from parallelcluster_support import use_settings

from dtp.costs import MODEL_PARAMETERS
from dtp.naming import RunNames
from dtp.params import (
    RESERVED_ENV,
    ParamsError,
    TrainParams,
    validate_params,
)
from dtp.pipeline.spec import build_spec, checkpoint_space_problem, sample_corpus_problem
from dtp.platforms import get_platform
from dtp.recipes import catalogue, get_recipe
from dtp.templates import TEMPLATE_DIR

BIG_70B = {
    "platform": "parallelcluster",
    "recipe": "llama3_1_70b",
    "instance_type": "p5.48xlarge",
    "num_nodes": 16,
    "max_steps": 1000,
    "checkpoint_interval": 250,
}


INSTANCE_PROFILE = "arn:aws:iam::123456789012:instance-profile/ecs"
NAMES = RunNames("train_e2e", "manual__1")


def refuse(conf: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        validate_params(conf)
    message = str(info.value)
    assert message.startswith("invalid parameters:")
    return message


# --- valid --------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    params = validate_params({})
    assert params == TrainParams()
    assert params.platform == "local"
    assert params.recipe == "tiny"
    assert params.instance_type == "local.cpu"
    assert params.dataset_uri == ""
    assert params.extra_env == {}


def test_defaults_match_the_tiny_recipe_defaults() -> None:
    # The trigger form's defaults must be the local profile's recipe, or a default run would be refused.
    tiny = catalogue()["tiny"].defaults
    params = TrainParams()
    assert (params.platform, params.instance_type, params.num_nodes) == (
        tiny.platform,
        tiny.instance_type,
        tiny.num_nodes,
    )
    assert (params.max_steps, params.checkpoint_interval) == (tiny.max_steps, tiny.checkpoint_interval)


@pytest.mark.parametrize(
    "conf",
    [
        {"num_nodes": 1},
        {"num_nodes": 512},
        {"dataset_uri": "s3://my-bucket/datasets/sample/"},
        {"dataset_uri": "s3://my.bucket.name"},
        {"dataset_uri": "s3://abc/a/b_c-d.e*f(g)!h'i/"},
        {"dataset_uri": "s3://my-bucket/ds/lang=en/"},
        {"dataset_uri": "s3://my-bucket/ds+v2/"},
        {"resume_from": "s3://dtp-artifacts-123456789012-us-east-1/runs/train_e2e-abc/checkpoints/"},
        {"max_steps": 50, "checkpoint_interval": 50},
        {"budget_usd": 0},  # local.cpu costs nothing
        {"extra_env": {"NCCL_DEBUG": "INFO", "_X1": "", "TORCH_LOGS": "+dynamo, a=b; c"}},
        {"extra_env": {f"V{i}": "x" for i in range(64)}},
        {"extra_env": {"LONG": "x" * 4096}},
        {"keep_cluster": True, "expiry_hours": 3.2, "hang_timeout_minutes": 1440},
    ],
)
def test_valid_confs_are_accepted(conf: dict[str, Any]) -> None:
    params = validate_params(conf)
    for key, value in conf.items():
        assert getattr(params, key) == value


# --- refused, with the field and the value in the message ---------------------------------------

BAD = [
    # (conf, field, text that must appear in the message: the offending value)
    ({"recipe": "nope"}, "recipe", "'nope'"),
    ({"recipe": "TINY"}, "recipe", "'TINY'"),
    ({"recipe": "../tiny"}, "recipe", "'../tiny'"),
    ({"num_nodes": 0}, "num_nodes", "got 0"),
    ({"num_nodes": 10000}, "num_nodes", "got 10000"),
    ({"num_nodes": -1}, "num_nodes", "got -1"),
    ({"num_nodes": 2.5}, "num_nodes", "got 2.5"),
    ({"num_nodes": None}, "num_nodes", "got None"),
    ({"num_nodes": [2]}, "num_nodes", "got [2]"),
    ({"num_nodes": "two"}, "num_nodes", "got 'two'"),
    ({"max_steps": 0}, "max_steps", "got 0"),
    ({"checkpoint_interval": 0}, "checkpoint_interval", "got 0"),
    ({"budget_usd": -1}, "budget_usd", "got -1"),
    ({"budget_usd": float("nan")}, "budget_usd", "got nan"),
    ({"expiry_hours": 0}, "expiry_hours", "got 0"),
    ({"expiry_hours": 721}, "expiry_hours", "got 721"),
    ({"hang_timeout_minutes": 0}, "hang_timeout_minutes", "got 0"),
    ({"pending_timeout_minutes": -1}, "pending_timeout_minutes", "got -1"),
    ({"keep_cluster": "maybe"}, "keep_cluster", "got 'maybe'"),
    ({"dataset_uri": "http://x"}, "dataset_uri", "'http://x'"),
    ({"dataset_uri": "s3://"}, "dataset_uri", "'s3://'"),
    ({"dataset_uri": "s3://UPPER/x"}, "dataset_uri", "'s3://UPPER/x'"),
    ({"dataset_uri": "s3://b/../../etc"}, "dataset_uri", "'s3://b/../../etc'"),
    ({"dataset_uri": "s3://bucket/a b"}, "dataset_uri", "'s3://bucket/a b'"),
    ({"dataset_uri": "s3://bucket/x\n"}, "dataset_uri", "'s3://bucket/x\\n'"),
    ({"dataset_uri": "s3://bucket/$(id)"}, "dataset_uri", "'s3://bucket/$(id)'"),
    ({"dataset_uri": "s3://bucket/a;b"}, "dataset_uri", "'s3://bucket/a;b'"),
    ({"dataset_uri": "s3://bucket/a&b|c"}, "dataset_uri", "'s3://bucket/a&b|c'"),
    ({"dataset_uri": "s3://bucket/`id`"}, "dataset_uri", "'s3://bucket/`id`'"),
    ({"dataset_uri": "s3://bucket/a,b"}, "dataset_uri", "'s3://bucket/a,b'"),
    ({"dataset_uri": "s3://-bucket/x"}, "dataset_uri", "'s3://-bucket/x'"),
    ({"dataset_uri": "file:///etc/passwd"}, "dataset_uri", "'file:///etc/passwd'"),
    ({"resume_from": "s3://b/runs/../../etc/"}, "resume_from", "'s3://b/runs/../../etc/'"),
    ({"resume_from": "s3://b/runs/x; rm -rf /"}, "resume_from", "'s3://b/runs/x; rm -rf /'"),
    ({"instance_type": "p5.48xlarge; rm -rf /"}, "instance_type", "'p5.48xlarge; rm -rf /'"),
    ({"instance_type": "$(id)"}, "instance_type", "'$(id)'"),
    ({"instance_type": "local.cpu\n"}, "instance_type", "'local.cpu\\n'"),
    ({"instance_type": ""}, "instance_type", "got ''"),
    ({"instance_type": "m5.large"}, "instance_type", "'m5.large'"),
    ({"instance_type": "p5.48xlarge"}, "instance_type", "'p5.48xlarge'"),
    ({"platform": "azure"}, "platform", "'azure'"),
    ({"extra_env": {"A B": "x"}}, "extra_env", "'A B'"),
    ({"extra_env": {"1X": "x"}}, "extra_env", "'1X'"),
    ({"extra_env": {"lower": "x"}}, "extra_env", "'lower'"),
    ({"extra_env": {"X;Y": "x"}}, "extra_env", "'X;Y'"),
    ({"extra_env": {"": "x"}}, "extra_env", "''"),
    ({"extra_env": {"V" * 65: "x"}}, "extra_env", "VVVVV"),
    ({"extra_env": {"PATH": "/evil"}}, "extra_env", "'PATH'"),
    ({"extra_env": {"LD_PRELOAD": "/evil.so"}}, "extra_env", "'LD_PRELOAD'"),
    # bash's read-only variables end the job script under set -e; Batch reserves its own names.
    ({"extra_env": {"UID": "0"}}, "extra_env", "'UID'"),
    ({"extra_env": {"SHELLOPTS": "x"}}, "extra_env", "'SHELLOPTS'"),
    ({"extra_env": {"BASH_VERSINFO": "x"}}, "extra_env", "'BASH_VERSINFO'"),
    ({"extra_env": {"PYTHONHOME": "/x"}}, "extra_env", "'PYTHONHOME'"),
    ({"extra_env": {"AWS_BATCH_JOB_ID": "x"}}, "extra_env", "'AWS_BATCH_JOB_ID'"),
    ({"extra_env": {"X": "a\nb"}}, "extra_env", "'X'"),
    ({"extra_env": {"X": "a\rb"}}, "extra_env", "'X'"),
    ({"extra_env": {"X": "a\0b"}}, "extra_env", "'X'"),
    ({"extra_env": {"X": "x" * 4097}}, "extra_env", "'X'"),
    ({"extra_env": {"X": 1}}, "extra_env.X", "got 1"),
    ({"extra_env": ["X=1"]}, "extra_env", "['X=1']"),
    ({"extra_env": {f"V{i}": "x" for i in range(65)}}, "extra_env", "65"),
    ({"max_steps": 10, "checkpoint_interval": 20}, "checkpoint_interval", "got 20"),
    ({"max_steps": 5, "checkpoint_interval": 5, "profile_steps": 5}, "profile_steps", "below max_steps (5)"),
    ({"recipe": "llama3_1_8b_torchtitan", "profile_steps": 2}, "profile_steps", "only DTP's trainer"),
    # An expiry the run outlasts lets the reaper delete it while it runs: 300 steps of 0.25 s and the job's
    # 10 minutes to start, plus 2 h of setup.
    # The run may wait pending_timeout_minutes in the queue before it trains: the expiry counts that too.
    ({"expiry_hours": 2.5}, "expiry_hours", "plus up to 1.0 h pending (pending_timeout_minutes): give at least 3.2"),
    ({"expiry_hours": 1.5, "pending_timeout_minutes": 0}, "expiry_hours", "results: give at least 2.2"),
    (
        {
            "recipe": "llama3_1_70b",
            "platform": "parallelcluster",
            "instance_type": "p5.48xlarge",
            "num_nodes": 8,
            "max_steps": 1000,
            "budget_usd": 1e6,
            "expiry_hours": 3,
        },
        "expiry_hours",
        # 1000 steps of 8 s, 20 checkpoints (one every 50 steps) of 847 GB at the default FSx's 293 MB/s, 10 min
        # to start.
        "18.4 h of training",
    ),
    # Only Slurm reads exclude_nodes: elsewhere the node would still be used.
    (
        {"platform": "eks", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "exclude_nodes": "n1"},
        "exclude_nodes",
        "'n1'; platform 'eks' does not schedule with Slurm",
    ),
    # A cluster made for the run has nodes no one could name beforehand.
    (
        {"platform": "parallelcluster", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "exclude_nodes": "n1"},
        "exclude_nodes",
        "'n1'; platform 'parallelcluster' creates a cluster for each run",
    ),
]


@pytest.mark.parametrize(("conf", "field", "value"), BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_conf_is_refused_naming_field_and_value(conf: dict[str, Any], field: str, value: str) -> None:
    message = refuse(conf)
    assert f"\n{field}: " in message, message
    assert value in message, message


def test_unknown_key_is_refused_naming_the_key_and_the_allowed_ones() -> None:
    message = refuse({"num_nodes": 2, "nodes": 4})
    assert "nodes: unknown parameter" in message
    for name in TrainParams.model_fields:
        assert name in message


def test_every_schema_problem_is_reported_at_once() -> None:
    message = refuse({"num_nodes": 0, "dataset_uri": "http://x", "typo": 1})
    for field in ("num_nodes", "dataset_uri", "typo"):
        assert f"\n{field}: " in message, message


def test_every_catalogue_problem_is_reported_at_once() -> None:
    # Checks against the catalogue run once the conf has the right shape, and are reported together.
    message = refuse({"platform": "eks", "recipe": "nope", "instance_type": "m5.large", "max_steps": 5})
    for field in ("recipe", "instance_type", "checkpoint_interval"):
        assert f"\n{field}: " in message, message


def test_unknown_recipe_lists_the_available_ones() -> None:
    message = refuse({"recipe": "nope"})
    for name in catalogue():
        assert name in message


def test_instance_type_not_on_platform_lists_what_is() -> None:
    message = refuse({"instance_type": "p5.48xlarge"})
    assert "not offered on platform 'local'" in message
    assert "allowed there: local.cpu" in message


@pytest.mark.parametrize("platform", ["eks", "batch"])
def test_off_slurm_dtps_fsdp_trainer_runs_and_other_frameworks_are_refused(
    platform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = {"instance_role_arn": INSTANCE_PROFILE, "launch_template_id": "lt-0123456789abcdef0"}
    extra = {"cluster_name": "c"} if platform == "eks" else batch
    monkeypatch.setenv(f"AIRFLOW_CONN_DTP_{platform.upper()}", json.dumps({"conn_type": "generic", "extra": extra}))
    # Batch's multi-node EFA jobs need the launch template, which mounts a file system of an existing VPC.
    vpc = {"vpc_id": "vpc-0123456789abcdef0", "private_subnet": "subnet-0123456789abcdef0"}
    vpc["security_group"] = "sg-0123456789abcdef0"
    monkeypatch.setenv("AIRFLOW_CONN_DTP_NETWORK", json.dumps({"conn_type": "generic", "extra": vpc}))
    conf = {"platform": platform, "instance_type": "p5.48xlarge", "num_nodes": 2, "budget_usd": 1000.0}
    spec = build_spec({}, {**conf, "recipe": "llama3_1_8b"}, NAMES)
    assert (spec["params"]["platform"], spec["recipe"]["framework"]) == (platform, "fsdp")
    with pytest.raises(ParamsError) as info:
        build_spec({}, {**conf, "recipe": "llama3_1_8b_nemo"}, NAMES)
    assert (
        f"recipe: got 'llama3_1_8b_nemo', which trains with nemo; on {platform} DTP runs its own FSDP trainer only"
    ) in str(info.value)


def test_nodes_that_do_not_fit_the_model_split_are_refused() -> None:
    # TP 8 x PP 2 = 16 GPUs per model replica; one p5 node has 8.
    message = refuse({"recipe": "llama3_1_70b_megatron", "num_nodes": 1, "instance_type": "p5.48xlarge"})
    assert "\nnum_nodes: got 1; recipe 'llama3_1_70b_megatron' splits the model over 16 accelerators" in message


def test_a_megatron_run_no_longer_than_its_warmup_is_refused_before_anything_exists() -> None:
    megatron = {"recipe": "llama3_1_70b_megatron", "num_nodes": 16, "instance_type": "p5.48xlarge", "max_steps": 200}
    assert (
        "\nmax_steps: got 200; Megatron-LM requires the learning rate's warmup of recipe 'llama3_1_70b_megatron' "
        "(200 steps) to end before the last step: give more than 200"
    ) in refuse(megatron)
    assert "max_steps" not in refuse({**megatron, "max_steps": 201})


def test_a_framework_recipe_needs_its_prepared_dataset() -> None:
    megatron = {"recipe": "llama3_1_70b_megatron", "num_nodes": 16, "instance_type": "p5.48xlarge"}
    assert (
        "\ndataset_uri: empty; recipe 'llama3_1_70b_megatron' (megatron-lm) trains on a dataset prepared in its "
        "format: give the S3 prefix that holds it (train_text_document.bin, train_text_document.idx)"
    ) in refuse(megatron)
    assert "dataset_uri" not in refuse({**megatron, "dataset_uri": "s3://corpus/megatron/", "num_nodes": 1})
    # DTP's trainer falls back to the shipped corpus; NeMo's recipes train on synthetic tokens.
    for recipe in ("llama3_1_8b", "llama3_1_8b_nemo"):
        assert "dataset_uri" not in refuse({"recipe": recipe, "num_nodes": 1, "instance_type": "p5.48xlarge"})


@pytest.mark.parametrize(
    ("recipe", "instance_type", "runs_on"),
    [
        ("llama3_1_8b", "trn1.32xlarge", "GPUs or CPUs, not Trainium"),
        ("llama3_1_8b_trn1", "p5.48xlarge", "Trainium only"),
    ],
)
def test_a_recipe_on_an_accelerator_its_framework_cannot_use_is_refused(
    recipe: str, instance_type: str, runs_on: str
) -> None:
    # DTP's trainer on a trn1 would find no CUDA device and train on the CPUs for the whole budget.
    conf = {"recipe": recipe, "platform": "parallelcluster", "instance_type": instance_type, "num_nodes": 4}
    assert f"instance_type: got {instance_type!r} (" in refuse(conf)
    assert f"which runs on {runs_on}" in refuse(conf)


def test_reserved_env_names_are_all_refused() -> None:
    for name in [*RESERVED_ENV, "SLURM_NNODES", "PET_NNODES", "TORCHELASTIC_RESTART_COUNT"]:
        assert "set by the pipeline" in refuse({"extra_env": {name: "x"}})
    assert validate_params({"extra_env": {"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "4"}}).extra_env


@pytest.mark.parametrize("name", ["UID", "RANDOM", "SRANDOM", "OPTIND", "HISTCMD", "SHELLOPTS"])
def test_the_variables_whose_export_ends_a_job_script_are_reserved(name: str) -> None:
    # The job scripts run under set -euo pipefail: exporting one of these (read-only, or arithmetic in bash)
    # would end the job after its cluster exists.
    run = subprocess.run(["bash", "-c", f"set -euo pipefail; export {name}=x; echo ok"], capture_output=True)
    assert run.returncode != 0
    assert name in RESERVED_ENV


def test_the_variables_the_job_scripts_assign_are_reserved() -> None:
    # A user's export comes first in the job (_env.sh.j2): one of these would move the rendezvous or the checkpoint.
    scripts = [*(TEMPLATE_DIR / "slurm").glob("*.sbatch.j2"), TEMPLATE_DIR / "slurm" / "_env.sh.j2"]
    assigned = {name for path in scripts for name in re.findall(r"^\s*([A-Z_][A-Z0-9_]*)=", path.read_text(), re.M)}
    assert {"RDZV_HOST", "TRAIN"} <= assigned
    assert assigned <= RESERVED_ENV


def test_huge_value_is_refused_with_a_short_message() -> None:
    uri = "s3://bucket/" + "a" * (1 << 20)
    message = refuse({"dataset_uri": uri})
    assert "\ndataset_uri: " in message
    assert "at most 1024 characters" in message
    assert len(message) < 1000


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


# --- lax coercion (findings) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("num_nodes", "2"), ("num_nodes", True), ("keep_cluster", "yes"), ("budget_usd", "5")]
)
def test_wrongly_typed_values_are_refused(field: str, value: Any) -> None:
    message = refuse({field: value})
    assert f"\n{field}: " in message


def test_env_name_with_trailing_newline_is_refused() -> None:
    message = refuse({"extra_env": {"A\n": "x"}})
    assert "\nextra_env: " in message


# --- the trigger form -----------------------------------------------------------------------------


def test_a_recipe_sized_for_gpus_is_refused_on_cpu_nodes() -> None:
    # llama3_1_70b on the form's default 2 x local.cpu passed, and would have built its stacks before running out
    # of memory.
    message = refuse({"recipe": "llama3_1_70b"})
    assert (
        "instance_type: got 'local.cpu' (cpu); recipe 'llama3_1_70b' is sized for p5.48xlarge (H100) nodes" in message
    )
    assert "a recipe for CPUs (tiny, tiny_deep)" in message
    assert "Trainium only" in refuse({"recipe": "llama3_1_8b_trn1"}) and "sized for" not in refuse(
        {"recipe": "llama3_1_8b_trn1"}
    )


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
