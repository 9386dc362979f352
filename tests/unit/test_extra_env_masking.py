"""A run's extra_env may hold tokens (HF_TOKEN): their values are masked in the logs of the task that validates the
params and in what the Airflow UI shows of the jobs' rendered fields, though the secrets masker hides a value by its
name only in a mapping (``{"HF_TOKEN": ...}``), never in a PyTorchJob's env list or its YAML text."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import yaml
from airflow.sdk._shared.secrets_masker import redact
from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

from dtp.operators.batch import BatchJobOperator
from dtp.operators.pytorchjob import EksPyTorchJobOperator
from dtp.pipeline.graph import validate_params


def rendered(operator: Any, extra_env: dict[str, str]) -> str:
    """The operator's rendered fields, as the task sends them for the UI, of a run with ``extra_env``."""
    operator.render_template_fields({"params": {"extra_env": extra_env}})
    return json.dumps(_serialize_rendered_fields(operator))


def pytorchjob(env: list[dict[str, str]]) -> dict[str, Any]:
    container = {"name": "pytorch", "image": "dtp-training", "env": env}
    replica = {"replicas": 1, "template": {"spec": {"containers": [container]}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "run", "namespace": "kubeflow"},
            "spec": {"pytorchReplicaSpecs": {"Master": replica}}}  # fmt: skip


def test_the_rendered_manifest_does_not_show_extra_env_values() -> None:
    env = [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "HF_TOKEN", "value": "hf_manifest_token_1"}]
    for manifest in (pytorchjob(env), yaml.safe_dump(pytorchjob(env))):
        op = EksPyTorchJobOperator(task_id="train_on_eks", manifest=manifest, cluster_name="dtp")
        shown = rendered(op, {"HF_TOKEN": "hf_manifest_token_1"})
        assert "hf_manifest_token_1" not in shown and "HF_TOKEN" in shown
        assert op.job == pytorchjob(env)  # the job created is the manifest as given


def test_the_batch_jobs_logged_overrides_do_not_show_extra_env_values(offline_aws: None) -> None:
    env = [{"name": "HF_TOKEN", "value": "hf_overrides_token_1"}]
    overrides = {"nodePropertyOverrides": [{"targetNodes": "0:", "containerOverrides": {"environment": env}}]}
    op = BatchJobOperator(
        task_id="train_on_batch", job_name="run-train", job_queue="run-queue", job_definition="run-train:1",
        node_overrides=overrides, aws_conn_id=None,
    )  # fmt: skip
    op.render_template_fields({"params": {"extra_env": {"HF_TOKEN": "hf_overrides_token_1"}}})
    # What the provider's submit_job logs of them ("AWS Batch job - node properties: %s").
    shown = redact(str(op.node_overrides))
    assert "hf_overrides_token_1" not in shown and "HF_TOKEN" in shown


def test_validate_params_masks_extra_env_values_in_its_log(moto_aws: Any, monkeypatch: Any, installation: str) -> None:
    # The platform and recipe of test_framework_images' refusal, with the recipe's image published.
    extra = {"execution_role_arn": "arn:aws:iam::111122223333:role/hp", "lifecycle_bucket": "sagemaker-dtp-lc"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps({"conn_type": "generic", "extra": extra}))
    image = "registry.example.com/dtp/nemo@sha256:" + "c" * 64
    moto_aws("ssm").put_parameter(Name="/dtp/images/hyperpod/nemo", Value=image, Type="String")
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b_nemo", "instance_type": "p5.48xlarge", "budget_usd": 2000.0,
            "extra_env": {"WANDB_KEY": "wandb_params_token_1"}}  # fmt: skip
    run = SimpleNamespace(dag_id="train_e2e", run_id="manual__1", conf=conf, clear_number=0, logical_date=None,
                          run_type=SimpleNamespace(value="manual"))  # fmt: skip
    validate_params.function(params={}, dag_run=run)
    assert redact("logged: wandb_params_token_1") == "logged: ***"
