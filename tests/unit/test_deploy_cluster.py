"""DeployClusterOperator: a platform that is not set up fails the task at once, naming what to fix."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from dtp.operators.cluster import DeployClusterOperator
from dtp.params import TrainParams, parse_params
from dtp.pipeline.spec import run_spec


def test_a_platform_without_its_connection_fails_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_HYPERPOD", raising=False)
    params = parse_params(TrainParams, {"platform": "hyperpod", "instance_type": "m5.2xlarge"})
    operator = DeployClusterOperator(
        task_id="deploy_cluster", spec=run_spec(params, "train_e2e", "manual__1"), network={}
    )
    # AirflowFailException: the task fails now, whatever its retries; the teardowns still run.
    with pytest.raises(AirflowFailException, match=r"^connection 'dtp_hyperpod' is not defined; it holds the account"):
        operator.execute(context={})
