"""dtp.params: validate_params refuses every bad conf with a message naming the field and value (the recipe
against the run: test_params_recipes.py; the run's checkpoints, budget and corpus: test_params_sizing.py; the trigger
form's schema: test_trigger_form_schema.py)."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from params_support import refuse

from dtp.params import TrainParams, validate_params
from dtp.params_env import RESERVED_ENV
from dtp.recipes import catalogue
from dtp.templates import TEMPLATE_DIR

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
    ({"extra_env": {"X": 1}}, "extra_env.X", "got a value of type int"),
    ({"extra_env": ["X=1"]}, "extra_env", "got a value of type list"),
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
