"""A run's extra_env may hold tokens (HF_TOKEN): their values are masked in the logs of every task that takes the
run spec and in what the Airflow UI shows of their rendered fields, though the secrets masker hides a value by its
name only in a mapping (``{"HF_TOKEN": ...}``), never in a PyTorchJob's env list or its YAML text; values that
cannot be secrets (``false``, ``4``) are not masked."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, BaseOperator
from airflow.sdk._shared.secrets_masker import redact
from airflow.sdk.definitions.xcom_arg import PlainXComArg
from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

from dtp.form_params import parse_params
from dtp.operators.batch import BatchJobOperator
from dtp.operators.checkpoints import SaveCheckpointOperator
from dtp.operators.cluster import DeployClusterOperator, TeardownClusterOperator
from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.operators.pytorchjob import EksPyTorchJobOperator
from dtp.operators.report import ClusterValidationReportOperator, TrainingReportOperator
from dtp.params import TrainParams
from dtp.params_env import mask_extra_env
from dtp.pipeline.graph import prepare_training, training_pipeline, validate_params
from dtp.pipeline.spec import run_spec
from dtp.pipeline.spec_tasks import SpecTaskOperator, spec_task
from dtp.pipeline.validation import validation_pipeline
from dtp.platforms.eks import EksPlatform


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
    extra = {"execution_role_arn": "arn:aws:iam::111122223333:role/dtp-hp", "lifecycle_bucket": "sagemaker-dtp-lc"}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps({"conn_type": "generic", "extra": extra}))
    image = "registry.example.com/dtp/nemo@sha256:" + "c" * 64
    moto_aws("ssm").put_parameter(Name="/dtp/images/hyperpod/nemo", Value=image, Type="String")
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b_nemo", "instance_type": "p5.48xlarge", "budget_usd": 2000.0,
            "extra_env": {"WANDB_KEY": "wandb_params_token_1"}}  # fmt: skip
    run = SimpleNamespace(dag_id="train_e2e", run_id="manual__1", conf=conf, clear_number=0, logical_date=None,
                          run_type=SimpleNamespace(value="manual"))  # fmt: skip
    validate_params.function(params={}, dag_run=run)
    assert redact("logged: wandb_params_token_1") == "logged: ***"


def test_prepare_training_masks_extra_env_values_before_its_arguments_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_aws: None
) -> None:
    # Its PyTorchJob manifest, returned as an XCom, is logged whole ("Done. Returned value was: ..."), and its
    # arguments (the spec among them) are shown in the Rendered Template tab: NGC_KEY is no name the masker hides.
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": {"cluster_name": "dtp"}}))
    extra_env = {"NGC_KEY": "nvapi-secret-123"}
    conf = {"platform": "eks", "instance_type": "g5.48xlarge", "num_nodes": 1, "extra_env": extra_env}
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", "manual__1")
    cluster = {"platform": "eks", "scheduler": "kubernetes", "eks_cluster_name": "dtp", "shared_dir": str(tmp_path)}
    with DAG("train_e2e") as dag:
        prepare_training(spec, cluster, EksPlatform().default_image(), {"train_bin": "/fsx/t.bin"}, None)
    task: Any = dag.get_task("prepare_training")
    shown = rendered(task, extra_env)
    assert "nvapi-secret-123" not in shown and "NGC_KEY" in shown
    job = task.python_callable(*task.op_args)
    assert "nvapi-secret-123" in job["manifest"]  # the job gets the value
    assert redact("nvapi-secret-123") == "***"


@pytest.mark.parametrize(
    ("operator_class", "arguments"),
    [
        (DeployClusterOperator, {"network": {}}),
        (TeardownClusterOperator, {}),
        (SaveCheckpointOperator, {"cluster": {}}),
        (TrainingReportOperator, {"metrics": {}}),
        (ClusterValidationReportOperator, {"result": {}}),
    ],
    ids=["deploy_cluster", "teardown_cluster", "save_checkpoint", "report", "validation_report"],
)
def test_operators_that_take_the_spec_do_not_show_its_extra_env_values(
    operator_class: type[BaseOperator], arguments: dict[str, Any]
) -> None:
    extra_env = {"NGC_KEY": f"nvapi-{operator_class.__name__}-1"}  # its own value: the masker keeps what it was given
    op = operator_class(task_id="t", spec={"params": {"extra_env": extra_env}}, **arguments)
    shown = rendered(op, extra_env)
    assert extra_env["NGC_KEY"] not in shown and "NGC_KEY" in shown


def test_a_mapped_spec_task_masks_extra_env_values_before_its_arguments_render() -> None:
    # A mapped task renders the task it unmaps through _do_render_template_fields, not its render_template_fields.
    extra_env = {"NGC_KEY": "nvapi-mapped-secret-1"}

    @spec_task()
    def shard(spec: dict[str, Any], index: int) -> int:
        return index

    with DAG("mapped", params={"extra_env": {}}) as dag:
        shard.partial(spec={"params": {"extra_env": extra_env}}).expand(index=[0, 1])
    ti = SimpleNamespace(map_index=1, task=dag.get_task("shard"))
    context = {"dag": dag, "dag_run": SimpleNamespace(conf={"extra_env": extra_env}), "ti": ti}
    ti.task.render_template_fields(context)
    assert isinstance(ti.task, SpecTaskOperator) and ti.task.op_kwargs["index"] == 1  # the unmapped task
    shown = json.dumps(_serialize_rendered_fields(ti.task))
    assert "nvapi-mapped-secret-1" not in shown and "NGC_KEY" in shown


def test_flags_and_numbers_are_not_masked() -> None:
    # TOKENIZERS_PARALLELISM=false once turned every "false" of the logs into "***".
    mask_extra_env(
        {"extra_env": {"TOKENIZERS_PARALLELISM": "false", "NCCL_BUFFSIZE": "4194304", "HF_TOKEN": "hf_abcdef"}}
    )
    logged = "activation_checkpointing: false, NCCL buffer 4194304"
    assert redact(logged) == logged
    assert redact("hf_abcdef") == "***"


@pytest.mark.parametrize("pipeline", [training_pipeline, validation_pipeline], ids=["train_e2e", "validate_cluster"])
def test_every_task_that_takes_the_spec_masks_its_extra_env(pipeline: Any) -> None:
    with DAG("pipeline") as dag:
        pipeline(dag)
    takes_spec = [
        task
        for task in dag.tasks
        if task.task_id != "validate_params"
        and any(isinstance(arg, PlainXComArg) and arg.operator.task_id == "validate_params" for arg in _arguments(task))
    ]
    assert takes_spec
    # A Python task masks through SpecTaskOperator, an operator through ExtraEnvMaskingMixin, mapped or not (both
    # tested above); a mapped task is judged by the class it unmaps to.
    unmasked = [
        task.task_id
        for task in takes_spec
        if not issubclass(getattr(task, "operator_class", type(task)), ExtraEnvMaskingMixin)
    ]
    assert unmasked == []


def _arguments(task: Any) -> list[Any]:
    """What a task was given: a Python task's arguments, an operator's template fields."""
    if isinstance(task, PythonOperator):
        return [*task.op_args, *task.op_kwargs.values()]
    return [getattr(task, field, None) for field in task.template_fields]
