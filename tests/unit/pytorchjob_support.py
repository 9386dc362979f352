"""What the PyTorchJob tests share (test_pytorchjob*.py): the job's manifest, the EKS API stubbed with botocore's
Stubber pointing at the local Kubernetes API server of conftest.py, and the operator and trigger under test."""

from __future__ import annotations

import base64
import json
from typing import Any

import yaml
from botocore.stub import Stubber

from dtp.operators.pytorchjob import EksPyTorchJobOperator
from dtp.triggers.pytorchjob import PyTorchJobTrigger

CLUSTER, NAMESPACE, NAME = "dtp-training", "kubeflow", "run-abc123"
MANIFEST: dict[str, Any] = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"dtp.dev/run": NAME}},
    "spec": {"pytorchReplicaSpecs": {"Worker": {"replicas": 2, "template": {"spec": {"containers": []}}}}},
}


def describe_cluster(endpoint: str) -> dict[str, Any]:
    certificate = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    return {"cluster": {"name": CLUSTER, "status": "ACTIVE", "endpoint": endpoint,
                        "certificateAuthority": {"data": certificate}}}  # fmt: skip


def stub_eks(hook: Any, api: Any, calls: int = 1) -> Stubber:
    """Answer ``calls`` DescribeCluster requests (one per kubeconfig) with the local API server's endpoint."""
    stubber = Stubber(hook.eks_hook.conn)
    for _ in range(calls):
        stubber.add_response("describe_cluster", describe_cluster(api.endpoint), {"name": CLUSTER})
    stubber.activate()
    return stubber


def operator(manifest: dict[str, Any] = MANIFEST, **kwargs: Any) -> EksPyTorchJobOperator:
    return EksPyTorchJobOperator(
        task_id="run_job", manifest=yaml.safe_dump(manifest), cluster_name=CLUSTER, poll_interval=0, **kwargs
    )


def trigger(**kwargs: Any) -> PyTorchJobTrigger:
    return PyTorchJobTrigger(job_name=NAME, namespace=NAMESPACE, cluster_name=CLUSTER, poll_interval=0, **kwargs)


def wait_for_event(api: Any, trigger: PyTorchJobTrigger, first_event: Any, kubeconfigs: int = 1) -> dict[str, Any]:
    with stub_eks(trigger.hook, api, kubeconfigs) as eks:
        event = first_event(trigger)
        eks.assert_no_pending_responses()  # it wrote ``kubeconfigs`` kubeconfigs
    return event


def created(api: Any) -> list[dict[str, Any]]:
    return [json.loads(body) for method, _, _, body in api.requests if method == "POST"]


def stamp(second: int, fraction: str = "") -> str:
    return f"2026-12-03T10:01:{second:02d}{fraction}Z"


def condition(kind: str, at: str, status: str = "True", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "lastTransitionTime": at, "message": message}


def event(status: str, state: str, message: str = "", tail: list[str] | None = None) -> dict[str, Any]:
    return {"status": status, "job_name": NAME, "namespace": NAMESPACE, "state": state, "message": message,
            "tail": tail or []}  # fmt: skip
