"""validate_cluster's connect step refuses a connection that is missing or not a Slurm one, before any job: a
connection whose extra names no transport would otherwise be taken for the worker's own cluster."""

from __future__ import annotations

import json

import pytest

from dtp.params import ParamsError
from dtp.pipeline.validation import connect


def _spec(conn_id: str) -> dict:
    return {"params": {"slurm_conn_id": conn_id, "num_nodes": 1, "exclude_nodes": "", "python": ""}}


def test_a_connection_that_is_not_a_slurm_one_is_refused(monkeypatch) -> None:
    aws = {"conn_type": "aws", "extra": {"region_name": "us-east-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_NOT_SLURM", json.dumps(aws))
    with pytest.raises(ParamsError, match="slurm_conn_id: got 'not_slurm'; its extra names no transport"):
        connect(_spec("not_slurm"))


def test_a_missing_connection_is_refused_by_name() -> None:
    with pytest.raises(ParamsError, match="slurm_conn_id: got 'no_such_cluster'; no such Airflow connection"):
        connect(_spec("no_such_cluster"))
