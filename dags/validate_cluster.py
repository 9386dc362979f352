"""validate_cluster: check an existing Slurm cluster before trusting it with a training run.

Runs train_e2e's preflight against the cluster behind a Slurm connection:
environment and versions on every node (torch, CUDA, NCCL, EFA installer,
libfabric, aws-ofi-nccl, driver), GPU health (ECC, Xid), and all-reduce bus
bandwidth over a size sweep compared with the instance type's expected figure.
Publishes a report (versions per node, busbw plot) and fails naming what is
wrong, and which nodes to exclude.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from dtp.form import airflow_params
from dtp.params import ValidateParams
from dtp.pipeline.validation import validation_pipeline

with DAG(
    dag_id="validate_cluster",
    description="Preflight checks and a report for an existing Slurm cluster",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params=airflow_params(model=ValidateParams),
    tags=["dtp", "validation"],
    default_args={"owner": "dtp", "retries": 2, "retry_delay": timedelta(seconds=10)},
) as dag:
    validation_pipeline(dag)
