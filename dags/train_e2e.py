"""train_e2e: the whole reference-architecture flow for one training run.

Deploys the network and S3 bucket (CloudFormation), provisions the cluster,
stages data, runs preflight checks, trains the recipe (DTP's FSDP trainer,
Megatron-LM, NeMo, torchtitan, ...) on the platform's scheduler (Slurm, EKS
PyTorchJobs or AWS Batch), collects metrics, judges the recipe's gates,
publishes a report, and tears everything down, also when a step failed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from dtp.form import airflow_params
from dtp.pipeline.graph import training_pipeline

with DAG(
    dag_id="train_e2e",
    description="Bare account to trained checkpoint, report, and nothing left running",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # Each run has its own stack, cluster and jobs, named from its run id; at most this many clusters at once.
    max_active_runs=4,
    params=airflow_params(),
    tags=["dtp", "training", "e2e"],
    default_args={"owner": "dtp", "retries": 2, "retry_delay": timedelta(seconds=10)},
) as dag:
    training_pipeline(dag)
