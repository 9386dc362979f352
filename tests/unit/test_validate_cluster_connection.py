"""validate_cluster's first steps: connect refuses a connection that is missing or not a Slurm one, before any job
(a connection whose extra names no transport would otherwise be taken for the worker's own cluster), and
validate_params names the run's jobs by its incarnation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dtp.form_params import ParamsError
from dtp.hooks.slurm import SlurmHook
from dtp.naming import RunNames
from dtp.pipeline.validation import connect, validate_params
from dtp.recipes import instance_types


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


def test_a_cleared_validation_run_gets_new_names(installation: str) -> None:
    # Clearing a whole finished run re-runs validate_params with a higher clear_number: its jobs get new names,
    # so it validates again instead of finding the first incarnation's finished preflight job.
    run = SimpleNamespace(conf={}, dag_id="validate_cluster", run_id="scheduled__1", clear_number=0)
    first = validate_params.function(params={}, dag_run=run)["names"]
    again = validate_params.function(params={}, dag_run=SimpleNamespace(**{**vars(run), "clear_number": 1}))["names"]
    assert first == RunNames("validate_cluster", "scheduled__1", 0, installation).as_dict()
    assert again == RunNames("validate_cluster", "scheduled__1", 1, installation).as_dict() != first


# sinfo -h -N -o "%N %t" on a cluster with two partitions: n1 and n2 are in both, n3 is drained, n4 does not answer,
# n5 is powered down (a cloud node Slurm resumes for a job).
SINFO = "n1 idle\nn1 idle\nn2 mix\nn2 mix\nn3 drain\nn4 idle*\nn5 idle~\n"


@pytest.fixture
def cluster(monkeypatch) -> str:
    extra = {"transport": "local", "slurm_conf": "/nonexistent/slurm.conf"}
    monkeypatch.setenv("AIRFLOW_CONN_TWO_PARTITIONS", json.dumps({"conn_type": "generic", "extra": extra}))
    monkeypatch.setattr(SlurmHook, "run", lambda self, argv, **kwargs: SINFO)
    return "two_partitions"


def test_only_nodes_that_take_jobs_count_once_each(cluster) -> None:
    assert SlurmHook(cluster).node_count() == 5
    assert connect({"params": {**_spec(cluster)["params"], "num_nodes": 3}})["nodes"] == 5
    with pytest.raises(ParamsError, match=r"got 4; .* has 3 nodes that take jobs \(of 5: the others are down, "):
        connect({"params": {**_spec(cluster)["params"], "num_nodes": 4}})
    with pytest.raises(ParamsError, match=r"3 nodes that take jobs .*, 1 once exclude_nodes='n\[1-3\]' is applied"):
        connect({"params": {**_spec(cluster)["params"], "num_nodes": 2, "exclude_nodes": "n[1-3]"}})


def test_a_remote_cluster_needs_the_interpreter_on_its_nodes(monkeypatch) -> None:
    # This worker's interpreter is not on the nodes of a cluster reached over ssh: the preflight job would fail,
    # and with it the report.
    extra = {"transport": "ssh", "ssh_conn_id": "head_node"}
    monkeypatch.setenv("AIRFLOW_CONN_REMOTE", json.dumps({"conn_type": "generic", "extra": extra}))
    with pytest.raises(ParamsError, match="python: empty; the cluster behind 'remote' is reached over ssh: give"):
        connect(_spec("remote"))


def test_a_remote_cluster_is_not_validated_as_the_local_profile_s_cpu_nodes(monkeypatch) -> None:
    # local.cpu (the form's default) would skip the GPU checks and expect 0.1 GB/s: a p5 cluster would pass as is.
    extra = {"transport": "ssh", "ssh_conn_id": "head_node"}
    monkeypatch.setenv("AIRFLOW_CONN_REMOTE", json.dumps({"conn_type": "generic", "extra": extra}))
    spec = _spec("remote")
    spec["params"] |= {"python": "/usr/bin/python3", "instance_type": "local.cpu"}
    spec["instance"] = instance_types()["local.cpu"].model_dump()
    with pytest.raises(ParamsError, match=r"instance_type: got 'local\.cpu', the local profile's; the cluster behind"):
        connect(spec)
