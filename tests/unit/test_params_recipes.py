"""dtp.params: validate_params and build_spec refuse a recipe the run cannot train: its framework off Slurm, a model
split the nodes do not fit, a Megatron-LM warmup as long as the run, a framework's dataset not given, an accelerator
its framework cannot use."""

from __future__ import annotations

import json

import pytest
from params_support import NAMES, refuse

from dtp.form_params import ParamsError
from dtp.pipeline.spec import build_spec

INSTANCE_PROFILE = "arn:aws:iam::123456789012:instance-profile/dtp-ecs"


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
