"""The reaper's sweep of the EKS clusters DTP trains on: the PyTorchJobs runs left past their expiry, found by their
``dtp.dev/run`` label and annotations on the local Kubernetes API server of conftest.py (the EKS API, which moto
cannot point at it, answered by botocore's Stubber), are deleted by the reaper's rules: another installation's
kept for a day, a live run's kept, a dry run deleting nothing, a cluster that cannot be asked failing its sweep."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import boto3
import pytest
import yaml
from botocore.stub import Stubber
from hyperpod_support import SETTINGS
from pytorchjob_support import describe_cluster

from dtp.form_params import parse_params
from dtp.hooks.pytorchjob import EksHook
from dtp.naming import EXPIRES_TAG, parse_expiry
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms.eks import EksPlatform
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.pytorchjobs import find_expired_pytorchjobs

EXPIRED = "2026-12-01T00:00:00Z"
NOW = parse_expiry(EXPIRED) + timedelta(hours=1)
INSTALLATION, OTHER_INSTALLATION = "0a1b2c3d", "4e5f6a7b"  # the reaper's, and one sharing the cluster
CLUSTER, HYPERPOD_CLUSTER = "dtp-training", "dtp-hyperpod-eks"
JOBS_PATH = "/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs"


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


@pytest.fixture(autouse=True)
def eks_connection(monkeypatch: pytest.MonkeyPatch, offline_aws: None) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": {"cluster_name": CLUSTER}}))


@pytest.fixture
def hyperpod_on_eks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtp_hyperpod`` with HyperPod on EKS, its jobs in the EKS cluster ``HYPERPOD_CLUSTER``'s kubeflow namespace."""
    eks = {"cluster_arn": f"arn:aws:eks:us-east-1:111122223333:cluster/{HYPERPOD_CLUSTER}"}
    extra = {**SETTINGS, "base_config_uri": "s3://dtp-reference/base-config/", "eks": eks}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", json.dumps({"conn_type": "generic", "extra": extra}))


@pytest.fixture
def eks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """The EKS API of every hook, which must have been asked each DescribeCluster it is given (one per kubeconfig)."""
    client = boto3.client("eks", region_name="us-east-1")
    monkeypatch.setattr(EksHook, "conn", client)
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def answer(eks: Stubber, endpoint: str, cluster: str = CLUSTER, times: int = 1) -> None:
    for _ in range(times):
        eks.add_response("describe_cluster", describe_cluster(endpoint), {"name": cluster})


def job(name: str, expires_at: str = EXPIRED, installation: str = INSTALLATION, run_id: str = "") -> dict[str, Any]:
    """A run's job, labelled and annotated as ``render_pytorchjobs`` does (``installation`` "": from before jobs
    named it); the run is its name, its DAG run train_e2e's ``run_id`` (default: ``manual__<name>``)."""
    annotations = {
        "dtp.dev/run": name,
        "dtp.dev/dag": "train_e2e",
        "dtp.dev/run-id": run_id or f"manual__{name}",
        "dtp.dev/expires-at": expires_at,
    }
    if installation:
        annotations["dtp.dev/installation"] = installation
    labels = {"dtp.dev/run": name, "dtp.dev/dag": "train_e2e"}
    return {"metadata": {"name": name, "namespace": "kubeflow", "labels": labels, "annotations": annotations}}


def find(**kwargs: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    findings = find_expired_pytorchjobs("aws_default", kwargs.pop("now", NOW), installation=INSTALLATION, **kwargs)
    return sorted((item.kind, item.name) for item in findings.found), findings.unsearched


def unreachable_endpoint() -> str:
    with socket.socket() as closed:  # a port nothing listens on once it is closed
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}"


def test_the_jobs_a_run_renders_are_found_once_expired_and_deleted(kubernetes_api: Any, eks: Stubber) -> None:
    params = parse_params(TrainParams, {"platform": "eks", "recipe": "tiny", "instance_type": "g5.48xlarge"})
    spec = run_spec(params, "train_e2e", "manual__2026-12-02", installation=INSTALLATION)
    documents = EksPlatform().render(spec, {})
    rendered = [yaml.safe_load(documents[name]) for name in ("preflight.yaml", "pytorchjob.yaml")]
    kubernetes_api.jobs = {document["metadata"]["name"]: document for document in rendered}
    kubernetes_api.jobs["someone-elses-job"] = {"metadata": {"name": "someone-elses-job", "labels": {"app": "x"}}}
    expires_at = parse_expiry(spec["tags"][EXPIRES_TAG])
    answer(eks, kubernetes_api.endpoint, times=3)

    assert find(now=expires_at - timedelta(minutes=1), active=no_run_active) == ([], {})
    findings = find_expired_pytorchjobs(
        "aws_default", expires_at + timedelta(minutes=1), active=no_run_active, installation=INSTALLATION
    )
    run_key = spec["names"]["run_key"]
    assert sorted((item.name, item.run_key, item.run_id) for item in findings.found) == [
        (f"{CLUSTER}/kubeflow/{run_key}", run_key, spec["run_id"]),
        (f"{CLUSTER}/kubeflow/{run_key}-preflight", run_key, spec["run_id"]),
    ]
    (method, path, authorization, _) = kubernetes_api.requests[0]
    assert (method, path.split("?")[0]) == ("GET", JOBS_PATH) and "labelSelector=dtp.dev%2Frun" in path
    assert authorization.startswith("Bearer k8s-aws-v1.")  # the EKS token of aws_default's credentials

    result = reap(findings.found, "aws_default", None, dry_run=False)
    assert len(result["deleted"]) == 2 and set(kubernetes_api.jobs) == {"someone-elses-job"}
    deletes = [path for method, path, *_ in kubernetes_api.requests if method == "DELETE"]
    assert sorted(deletes) == [
        f"{JOBS_PATH}/{run_key}-preflight?propagationPolicy=Foreground",
        f"{JOBS_PATH}/{run_key}?propagationPolicy=Foreground",
    ]


def test_an_expired_job_is_deleted_and_an_unexpired_one_kept(kubernetes_api: Any, eks: Stubber) -> None:
    kubernetes_api.jobs = {"dtp-old": job("dtp-old"), "dtp-new": job("dtp-new", expires_at="2999-01-01T00:00:00Z")}
    answer(eks, kubernetes_api.endpoint, times=2)
    findings = find_expired_pytorchjobs("aws_default", NOW, active=no_run_active, installation=INSTALLATION)
    assert [item.name for item in findings.found] == [f"{CLUSTER}/kubeflow/dtp-old"]
    reap(findings.found, "aws_default", None, dry_run=False)
    assert set(kubernetes_api.jobs) == {"dtp-new"}


def test_another_installations_job_is_kept_for_a_day_past_its_expiry(kubernetes_api: Any, eks: Stubber) -> None:
    # Staging and prod train on the same cluster: each leaves the other's expired jobs to it for a day.
    kubernetes_api.jobs = {
        "dtp-mine": job("dtp-mine"),
        "dtp-theirs": job("dtp-theirs", installation=OTHER_INSTALLATION),
        "dtp-older": job("dtp-older", installation=""),  # from before jobs named their installation
    }
    answer(eks, kubernetes_api.endpoint, times=2)
    mine = [("pytorchjob", f"{CLUSTER}/kubeflow/dtp-mine"), ("pytorchjob", f"{CLUSTER}/kubeflow/dtp-older")]
    day = parse_expiry(EXPIRED) + timedelta(hours=23)
    assert find(now=day, active=no_run_active) == (mine, {})
    later = parse_expiry(EXPIRED) + timedelta(hours=25)
    theirs = ("pytorchjob", f"{CLUSTER}/kubeflow/dtp-theirs")
    assert find(now=later, active=no_run_active) == (sorted([*mine, theirs]), {})


def test_a_job_of_a_run_still_running_is_kept(kubernetes_api: Any, eks: Stubber) -> None:
    # train_e2e's run cleared after its expiry: its job carries the expiry its validate_params fixed.
    kubernetes_api.jobs = {"dtp-live": job("dtp-live"), "dtp-done": job("dtp-done")}
    answer(eks, kubernetes_api.endpoint)
    asked: list[tuple[str, str]] = []

    def active(dag_id: str, run_id: str) -> bool:
        asked.append((dag_id, run_id))
        return run_id == "manual__dtp-live"

    assert find(active=active) == ([("pytorchjob", f"{CLUSTER}/kubeflow/dtp-done")], {})
    assert sorted(asked) == [("train_e2e", "manual__dtp-done"), ("train_e2e", "manual__dtp-live")]


def test_a_dry_run_deletes_nothing(kubernetes_api: Any, eks: Stubber) -> None:
    kubernetes_api.jobs = {"dtp-old": job("dtp-old")}
    answer(eks, kubernetes_api.endpoint)  # the search's kubeconfig only: the dry run asks no cluster
    findings = find_expired_pytorchjobs("aws_default", NOW, active=no_run_active, installation=INSTALLATION)
    result = reap(findings.found, "aws_default", None, dry_run=True)
    assert [item["name"] for item in result["found"]] == [f"{CLUSTER}/kubeflow/dtp-old"] and result["deleted"] == []
    assert set(kubernetes_api.jobs) == {"dtp-old"}
    assert [method for method, *_ in kubernetes_api.requests] == ["GET"]


def test_hyperpod_on_eks_jobs_are_swept_too(kubernetes_api: Any, eks: Stubber, hyperpod_on_eks: None) -> None:
    kubernetes_api.jobs = {"dtp-old": job("dtp-old")}
    answer(eks, kubernetes_api.endpoint)
    answer(eks, kubernetes_api.endpoint, HYPERPOD_CLUSTER)
    assert find(active=no_run_active) == (
        [("pytorchjob", f"{HYPERPOD_CLUSTER}/kubeflow/dtp-old"), ("pytorchjob", f"{CLUSTER}/kubeflow/dtp-old")],
        {},
    )


def test_a_cluster_that_cannot_be_asked_fails_the_sweep_once_the_others_are_deleted(
    kubernetes_api: Any, eks: Stubber, hyperpod_on_eks: None
) -> None:
    kubernetes_api.jobs = {"dtp-old": job("dtp-old")}
    answer(eks, kubernetes_api.endpoint)
    answer(eks, unreachable_endpoint(), HYPERPOD_CLUSTER)
    findings = find_expired_pytorchjobs("aws_default", NOW, active=no_run_active, installation=INSTALLATION)
    assert [item.name for item in findings.found] == [f"{CLUSTER}/kubeflow/dtp-old"]
    where = f"pytorchjob on {HYPERPOD_CLUSTER}/kubeflow (dtp_hyperpod)"
    assert list(findings.unsearched) == [where] and "MaxRetryError" in findings.unsearched[where]

    answer(eks, kubernetes_api.endpoint)
    with pytest.raises(ReapIncomplete, match=rf"deleted 1 of 1 .*\n{re.escape(where)}: MaxRetryError"):
        reap(findings.found, "aws_default", None, dry_run=False, unsearched=findings.unsearched)
    assert kubernetes_api.jobs == {}


def test_a_job_that_cannot_be_deleted_is_reported(kubernetes_api: Any, eks: Stubber) -> None:
    kubernetes_api.jobs = {"dtp-old": job("dtp-old")}
    answer(eks, kubernetes_api.endpoint)
    findings = find_expired_pytorchjobs("aws_default", NOW, active=no_run_active, installation=INSTALLATION)
    kubernetes_api.unauthorized = {2}  # the delete: the reaper's identity has no access entry (RBAC) any more
    answer(eks, kubernetes_api.endpoint)
    denied = r"(?s)run dtp-old: pytorchjob dtp-training/kubeflow/dtp-old: \(401\).*Unauthorized"
    with pytest.raises(ReapIncomplete, match=denied):
        reap(findings.found, "aws_default", None, dry_run=False)
    assert set(kubernetes_api.jobs) == {"dtp-old"}


def test_platforms_without_a_connection_or_on_slurm_are_not_asked(
    monkeypatch: pytest.MonkeyPatch, eks: Stubber, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DTP_EKS")
    extra = json.dumps({"conn_type": "generic", "extra": SETTINGS})  # HyperPod orchestrated by Slurm
    monkeypatch.setenv("AIRFLOW_CONN_DTP_HYPERPOD", extra)
    with caplog.at_level("INFO", logger="dtp.reaper.pytorchjobs"):
        assert find(active=no_run_active) == ([], {})
    assert "No dtp_eks connection is defined" in caplog.text
    assert "dtp_hyperpod has no eks" in caplog.text


def test_a_connection_that_cannot_be_read_is_reported(monkeypatch: pytest.MonkeyPatch, eks: Stubber) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_EKS", json.dumps({"conn_type": "generic", "extra": {}}))
    jobs, unsearched = find(active=no_run_active)
    assert jobs == [] and "cluster_name: Field required" in unsearched["pytorchjob (dtp_eks)"]
